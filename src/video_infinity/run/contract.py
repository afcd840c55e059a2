"""The contract between a front-end (the web UI) and the runs it starts: four typed messages, each a
JSON file written atomically in the run's status folder and read back through the same class.

======================  ===========================  =============================================
message                 file in the status folder    written by, read by
======================  ===========================  =============================================
:class:`RunRequest`     ``request.json``             the UI; ``video-infinity generate --request``
:class:`ProgressEvent`  ``rank<r>.json``             each rank (:mod:`.progress`); the UI
:class:`RunResult`      ``result.json``              the launcher, once the video is written; the UI
:class:`ErrorReport`    ``error.json``               the launcher (a torchrun rank: itself); the UI
======================  ===========================  =============================================

A run ends with exactly one of ``result.json`` and ``error.json`` (neither: the launcher was killed).
Nothing is passed through environment variables or read out of a run's stdout/stderr: those stay a
log for people. Every message carries ``version``; a file of another version is refused with one
line naming both, since the two sides then come from different installs.

Imports pydantic and the run config only (no torch): the web server imports it cheaply. When the
package's generation-request schema lands, it replaces :attr:`RunRequest.config` here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..atomic import write_json_atomic
from ..errors import RunInterrupted, VideoInfinityError, one_line
from .config import RunConfig

CONTRACT_VERSION = 1
"""Bumped whenever a message changes shape; readers refuse any other version."""
PHASES = ("loading", "denoising", "decoding", "done")
"""A rank's phases, in order."""
ExitKind = Literal["user_error", "failure", "interrupted"]
_MAX_BYTES = 4 << 20  # a message is a few kB; anything this large is not one


class ContractError(ValueError):
    """A message file that cannot be read as its message (malformed, another kind or version)."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str]
    """The message's name in its file (``"kind"``), checked on reading."""
    version: int = CONTRACT_VERSION

    def payload(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.model_dump(mode="json")}


class RunRequest(_Message):
    """What a front-end asks of a run: the run config and how to treat existing files."""

    kind: ClassVar[str] = "request"
    config: RunConfig
    """The run, as ``video-infinity generate --config`` reads it."""
    config_path: str | None = None
    """The config file saved beside the outputs (no output may replace it; None: none saved)."""
    resume: str | None = None
    """A checkpoint to continue from (``--resume``)."""
    overwrite: bool = False
    """Replace existing outputs (``--overwrite``)."""
    contact_sheet: bool = False
    """Also write ``<base_path>/<name>.png``, a grid of up to 32 frames, once the video is written."""
    step_sleep_s: float = Field(default=0.0, ge=0.0)
    """Test only: seconds each rank sleeps after each denoising step, so that a test can watch the
    steps and stop a run at a known one. A field, not an environment variable: it reaches the ranks
    the way the config does and cannot leak into a user's run from an exported variable."""


class ProgressEvent(_Message):
    """One rank's progress, replaced at each phase and after each denoising step."""

    kind: ClassVar[str] = "progress"
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    pid: int
    """The rank's process (tests signal it)."""
    phase: Literal["loading", "denoising", "decoding", "done"]
    step: int = Field(default=0, ge=0)
    """Denoising steps done, counted over the whole schedule (a resumed run starts above 0)."""
    steps: int | None = None
    start_step: int = 0
    """The step this run started at (a resumed run's earlier steps are not timed)."""
    denoise_started: float | None = None
    """Epoch seconds when this run's denoising began."""
    time: float
    """Epoch seconds of this event."""


class RunResult(_Message):
    """A finished run: its files (absolute paths) and the facts the UI shows at once."""

    kind: ClassVar[str] = "result"
    video: str
    sidecar: str
    latents: str | None = None
    contact_sheet: str | None = None
    seed: int
    world_size: int
    total_frames: int
    seconds: dict[str, float]
    """Per stage (``load``, ``denoise``, ``decode_and_write``, ...) and ``total``."""
    peak_memory_bytes: list[int]
    """Per rank."""

    @classmethod
    def from_sidecar(cls, files: dict[str, Path], sidecar: dict[str, Any], contact_sheet: Path | None) -> RunResult:
        """The result of a run whose ``files`` (``video``, ``sidecar``, maybe ``latents``) are written."""
        return cls(video=str(files["video"]), sidecar=str(files["sidecar"]),
                   latents=str(files["latents"]) if "latents" in files else None,
                   contact_sheet=None if contact_sheet is None else str(contact_sheet), seed=sidecar["seed"],
                   world_size=sidecar["world_size"], total_frames=sidecar["total_frames"],
                   seconds={k: float(v) for k, v in sidecar["seconds"].items()},
                   peak_memory_bytes=[int(b) for b in sidecar["peak_memory_bytes"]])


class ErrorReport(_Message):
    """Why a run ended without a video: the one line the command line prints, and which rank."""

    kind: ClassVar[str] = "error"
    message: str
    rank: int | None = None
    """The rank whose failure brought the run down (None: the launcher itself, e.g. a refused config)."""
    exit_kind: ExitKind
    """``user_error`` (something to fix in the request: exit code 2), ``failure`` or ``interrupted``."""
    exit_code: int

    @classmethod
    def from_exception(cls, exc: BaseException, rank: int | None = None) -> ErrorReport:
        """The report of an exception that ended a run (the package's errors, or Ctrl-C)."""
        if isinstance(exc, (RunInterrupted, KeyboardInterrupt)):
            code = exc.exit_code if isinstance(exc, RunInterrupted) else 130
            return cls(message=str(exc) or "interrupted", rank=rank, exit_kind="interrupted", exit_code=code)
        code = exc.exit_code if isinstance(exc, VideoInfinityError) else 1
        if rank is None and isinstance(exc, VideoInfinityError):
            rank = exc.rank
        # Exit code 2 is the package's code for what the user fixes (errors.UserError, or a rank's
        # refusal of its model or checkpoint reported by the launcher as a RunError with that code).
        return cls(message=one_line(str(exc)) or type(exc).__name__, rank=rank,
                   exit_kind="user_error" if code == 2 else "failure", exit_code=code)


M = TypeVar("M", bound=_Message)


def write_message(path: str | os.PathLike[str], message: _Message) -> None:
    """``message`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    write_json_atomic(path, message.payload())


def read_message(path: str | os.PathLike[str], cls: type[M]) -> M | None:
    """The ``cls`` message at ``path``; None when there is no such file. ContractError (one line)
    when the file is not that message: unreadable, half-written, another kind or another version."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise ContractError(f"{path}: not a {cls.kind} message (larger than {_MAX_BYTES} bytes)")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ContractError(f"{path}: not a {cls.kind} message ({one_line(str(exc))})") from None
    if not isinstance(data, dict) or data.get("kind") != cls.kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ContractError(f"{path}: not a {cls.kind} message (kind: {found!r})")
    if data.get("version") != CONTRACT_VERSION:
        raise ContractError(f"{path}: {cls.kind} message of contract version {data.get('version')!r}, this "
                            f"video-infinity reads version {CONTRACT_VERSION} (the UI and the run come from "
                            "different installs)")
    try:
        return cls.model_validate({k: v for k, v in data.items() if k != "kind"})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or cls.kind
        raise ContractError(f"{path}: not a {cls.kind} message ({where}: {first['msg']})") from None


@dataclass(frozen=True)
class StatusFolder:
    """The folder where one run and its front-end exchange the messages (picklable: ranks get it)."""

    path: Path

    REQUEST: ClassVar[str] = "request.json"
    RESULT: ClassVar[str] = "result.json"
    ERROR: ClassVar[str] = "error.json"

    @property
    def request_path(self) -> Path:
        return self.path / self.REQUEST

    def progress_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.json"

    def write_request(self, request: RunRequest) -> Path:
        write_message(self.request_path, request)
        return self.request_path

    def read_request(self) -> RunRequest:
        request = read_message(self.request_path, RunRequest)
        if request is None:
            raise ContractError(f"{self.request_path}: no request")
        return request

    def write_progress(self, event: ProgressEvent) -> None:
        write_message(self.progress_path(event.rank), event)

    def progress(self) -> list[ProgressEvent]:
        """Every rank's latest event, by rank (a file that is not an event is skipped: the run is
        still going, and the next poll reads it again)."""
        events = []
        for path in sorted(self.path.glob("rank*.json")):
            try:
                event = read_message(path, ProgressEvent)
            except ContractError:
                continue
            if event is not None:
                events.append(event)
        return sorted(events, key=lambda e: e.rank)

    def write_result(self, result: RunResult) -> None:
        write_message(self.path / self.RESULT, result)

    def write_error(self, report: ErrorReport) -> None:
        write_message(self.path / self.ERROR, report)

    def outcome(self) -> RunResult | ErrorReport | None:
        """How the run ended (None: no report, e.g. the launcher was killed); ContractError when a
        report is there but unreadable."""
        error = read_message(self.path / self.ERROR, ErrorReport)
        return error if error is not None else read_message(self.path / self.RESULT, RunResult)


@dataclass(frozen=True)
class RunChannel:
    """What every rank of a run is given of its front-end (picklable, passed like the config)."""

    folder: StatusFolder | None = None
    """Where the rank keeps its progress event (None: nowhere)."""
    step_sleep_s: float = 0.0
    """:attr:`RunRequest.step_sleep_s` (test only)."""


__all__ = ["CONTRACT_VERSION", "PHASES", "ContractError", "ErrorReport", "ProgressEvent", "RunChannel", "RunRequest",
           "RunResult", "StatusFolder", "read_message", "write_message"]
