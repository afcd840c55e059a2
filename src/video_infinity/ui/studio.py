"""What the web UI does, without the web: check a form, start, follow, cancel and resume one
generation at a time, and turn a finished run into what the page shows (video, contact sheet, the
demo probe's report, the sidecar's facts). :mod:`video_infinity.ui.app` only wires this to Gradio,
so all of it is testable in one process. Imports neither torch nor gradio.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import UserError
from ..run.config import RunConfig, validate_run_config
from ..run.contract import ErrorReport, RunRequest, RunResult
from ..run.preflight import prepare
from ..run.progress import RunProgress
from .form import FORM_IMAGES, FormError, GenerationForm, Limits, field_of, form_from_config, run_config
from .jobs import GenerationJob
from .runs import CONFIG_SUFFIX, RunRecord, find_run, inside

logger = logging.getLogger(__name__)

POLL_S = 0.25
"""How often a running job's progress files are read."""
_PLAIN_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")
"""An upload's file suffix kept on the run's copy of it (``.png``); any other is dropped."""


@dataclass(frozen=True)
class Outcome:
    """How a run ended, and what the page shows of it."""

    status: str
    """``done``, ``cancelled`` or ``failed``."""
    message: str
    record: RunRecord | None
    probe_report: str | None = None
    rank: int | None = None
    """The rank whose failure ended the run, as the run reported it (None: none, or not one rank)."""
    result: RunResult | None = None
    """What a finished run reported."""

    def headline(self) -> str:
        """The status line, e.g. ``**failed** (rank 1): rank 1 failed: ValueError: ...``."""
        on = f" (rank {self.rank})" if self.rank is not None else ""
        return f"**{self.status}**{on}: {self.message}"


def _is_demo(record: RunRecord) -> bool:
    """Made with an embedded demo model (``demo``, ``demo-wan``): the moving shapes the probe's object
    tracking understands."""
    from ..demo import EMBEDDED_MODELS

    config = record.config or {}
    return (config.get("model") is None or config.get("model") in EMBEDDED_MODELS) and config.get("motion_adapter") is None


def _world_size(record: RunRecord) -> int:
    return int((record.sidecar or {}).get("world_size") or 1)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "video"


class Studio:
    """The server's state: where runs go (``base_path``), its ceilings, and the one job running."""

    def __init__(self, base_path: str | Path, *, limits: Limits | None = None, template: RunConfig | None = None,
                 step_sleep_s: float = 0.0) -> None:
        self.base = Path(base_path).expanduser().resolve()
        self.limits = limits or Limits()
        self.template = template
        self.step_sleep_s = step_sleep_s
        """Test only (``serve --test-step-sleep``): put into every request, see :class:`RunRequest`."""
        self._lock = threading.Lock()
        self._job: GenerationJob | None = None

    # -- checking -----------------------------------------------------------------------------------

    def new_name(self, form: GenerationForm) -> str:
        """A fresh output stem: the first prompt and the time, made unique under ``base_path``."""
        stem = f"{_slug(form.prompts[min(form.prompts)])}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        name, index = stem, 1
        while any(self.base.glob(f"{name}.*")):  # a slug: no glob characters
            index += 1
            name = f"{stem}-{index}"
        return name

    def check(self, form: GenerationForm, name: str | None = None) -> tuple[RunConfig, str]:
        """The run config of ``form`` and its name, after every check the CLI makes before a rank
        starts (model folder, sizes, outputs, disk); FormError names the field."""
        name = name or self.new_name(form)
        config = run_config(form, base_path=str(self.base), file_name=name, limits=self.limits, template=self.template)
        self._preflight(config, self.base / f"{name}{CONFIG_SUFFIX}")
        return config, name

    def _preflight(self, config: RunConfig, config_path: Path, resume: Path | None = None) -> None:
        try:
            if not config.uses_cpu:
                from ..run.config import check_devices_available  # imports torch: GPU runs only

                check_devices_available(config)
            prepare(config, resume=resume, config_path=config_path)
        except UserError as exc:
            raise FormError(field_of(str(exc)), str(exc)) from None

    # -- running ------------------------------------------------------------------------------------

    @property
    def running(self) -> GenerationJob | None:
        job = self._job
        return job if job is not None and job.returncode is None else None

    def _one_at_a_time(self) -> None:
        if self.running is not None:
            raise FormError(None, "a generation is already running (one at a time: wait for it or cancel it)")

    def _start(self, config: RunConfig, config_path: Path, resume: Path | None = None) -> GenerationJob:
        self._job = GenerationJob(RunRequest(config=config, config_path=str(config_path),
                                             resume=None if resume is None else str(resume), contact_sheet=True,
                                             step_sleep_s=self.step_sleep_s))
        return self._job

    def start(self, form: GenerationForm) -> tuple[GenerationJob, str]:
        """Check ``form``, save its config as ``<base_path>/<name>.config.json`` and start the run.
        Its images are copied beside it first (``<name>.image.png``, see :meth:`keep_images`)."""
        with self._lock:
            self._one_at_a_time()
            config, name = self.check(form)
            kept = self.keep_images(form, name)
            if kept != form:  # the same files' copies: checked above, validated again for the config
                config = run_config(kept, base_path=str(self.base), file_name=name, limits=self.limits,
                                    template=self.template)
            config_path = self.base / f"{name}{CONFIG_SUFFIX}"
            write_json_atomic(config_path, config.model_dump(mode="json"))  # the gallery's record of the run
            return self._start(config, config_path), name

    def keep_images(self, form: GenerationForm, name: str) -> GenerationForm:
        """``form`` with each of its images copied to ``<base_path>/<name>.<field><suffix>``: a run keeps
        its images where its config and video are (an upload's file lives in Gradio's cache, which
        may be emptied; Resume and "use these settings" need them), and the page can show them."""
        copies: dict[str, str] = {}
        for field in FORM_IMAGES:
            source = getattr(form, field).strip()
            if not source:
                continue
            suffix = Path(source).suffix.lower()
            suffix = suffix if _PLAIN_SUFFIX.fullmatch(suffix) else ""
            target = self.base / f"{name}.{field}{suffix}"
            try:
                self.base.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(source).expanduser(), target)
            except OSError as exc:
                raise FormError(field, f"pipe_configs.{field}: cannot copy {source} to {target} ({exc})") from None
            copies[field] = str(target)
        return replace(form, **copies)

    def settings(self, name: str) -> tuple[GenerationForm, list[str]]:
        """What "use these settings" loads: the form that gives the run ``name`` back, and a note for
        each image left out: a file that is gone or lies outside base_path (the UI hands out nothing
        else), a continuation video (the form has no field for it)."""
        record = find_run(self.base, name)
        config = json.loads(json.dumps(record.config or {}))  # a copy, its images checked before it is validated
        pipe = config.get("pipe_configs") if isinstance(config.get("pipe_configs"), dict) else {}
        notes = []
        for field in (*FORM_IMAGES, "video"):
            path = pipe.get(field)
            if not isinstance(path, str):
                continue
            if field == "video":
                notes.append(f"pipe_configs.video: the form takes no continuation video ({path}); run the run's "
                             "config with the command line for it")
            elif not Path(path).is_file():
                notes.append(f"pipe_configs.{field}: {path} no longer exists; upload the image again")
            elif self.servable(Path(path)) is None:
                notes.append(f"pipe_configs.{field}: {path} is outside this server's base_path; upload it on the page")
            else:
                continue
            pipe[field] = None
        return form_from_config(config), notes

    def resume(self, name: str) -> tuple[GenerationJob, str]:
        """Continue the unfinished run ``name`` from its checkpoint (same config, this server's devices
        as saved)."""
        with self._lock:
            self._one_at_a_time()
            try:
                record = find_run(self.base, name)
                config = validate_run_config(record.config)
            except (ValueError, UserError) as exc:
                raise FormError(None, f"run: cannot resume {name!r}: {exc}") from None
            if record.status != "unfinished" or record.config_path is None or record.checkpoint is None:
                raise FormError(None, f"run: {name} has no checkpoint to resume (status: {record.status})")
            self._preflight(config, record.config_path, resume=record.checkpoint)
            return self._start(config, record.config_path, resume=record.checkpoint), name

    def cancel(self, wait: bool = True) -> bool:
        """Stop the running job, if any (every rank within seconds; its checkpoint is kept). ``wait=False``
        (the cancel button): return once the stop has begun; the job's follower reports its end."""
        job = self.running
        if job is None:
            return False
        job.cancel(wait=wait)
        return True

    def follow(self, job: GenerationJob) -> Iterator[RunProgress]:
        """The job's progress each time it changes, until the job ends."""
        last = None
        while True:
            done = job.returncode is not None
            progress = job.progress()
            key = (progress.phase, progress.step, progress.ranks_reporting)
            if key != last:
                last = key
                yield progress
            if done:
                return
            time.sleep(POLL_S)

    def finish(self, job: GenerationJob, name: str) -> Outcome:
        """Wait for ``job`` and describe how it ended, from the run's own report (its result or its
        error); a finished demo-model video also gets the probe's report."""
        code = job.wait()
        outcome = job.outcome()
        job.close()
        try:
            record: RunRecord | None = find_run(self.base, name)
        except ValueError:
            record = None
        if isinstance(outcome, RunResult):
            return Outcome("done", Path(outcome.video).name, record, self.probe_report(record) if record else None,
                           result=outcome)
        if job.cancelled or (isinstance(outcome, ErrorReport) and outcome.exit_kind == "interrupted"):
            kept = record is not None and record.checkpoint is not None
            note = "the checkpoint is kept: Resume continues it" if kept else "no checkpoint was saved yet"
            return Outcome("cancelled", f"every rank stopped; {note}", record)
        if isinstance(outcome, ErrorReport):
            return Outcome("failed", outcome.message, record, rank=outcome.rank)
        return Outcome("failed", f"the run ended without a report (exit code {code})", record)

    def probe_report(self, record: RunRecord) -> str | None:
        """The demo probe's report of a finished demo-model run (None for other models)."""
        if record.video is None or not _is_demo(record):
            return None
        from ..demo.probe import inspect_video

        try:
            return inspect_video(str(record.video), ranks=_world_size(record))
        except (OSError, ValueError) as exc:
            logger.warning("%s: no probe report (%s)", record.video, exc)
            return f"probe failed: {exc}"

    def servable(self, path: Path | None) -> str | None:
        """``path`` as a string when it lies under ``base_path`` (the only files the UI hands out)."""
        return str(path) if path is not None and inside(self.base, path) else None

