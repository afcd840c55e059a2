"""Live progress of a run, for front-ends (the web UI) and tests: with ``PROGRESS_DIR_ENV`` set
(``video-infinity generate --progress-dir DIR`` sets it), every rank keeps ``DIR/rank<r>.json``
up to date, replaced atomically at each phase and after each denoising step:
``{"rank", "world_size", "pid", "phase", "step", "steps", "start_step", "denoise_started", "time"}``
(``phase``: ``loading``, ``denoising``, ``decoding`` or ``done``; times are epoch seconds).

:func:`read_progress` turns the folder into one :class:`RunProgress` (the slowest rank's step,
seconds per step since this run's first step, time left). Imports neither torch nor numpy.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic

PROGRESS_DIR_ENV = "VIDEO_INFINITY_PROGRESS_DIR"
"""The folder where each rank records its progress (unset: nothing is written)."""
PHASES = ("loading", "denoising", "decoding", "done")


class ProgressReporter:
    """One rank's progress file (a no-op when ``folder`` is None)."""

    def __init__(self, rank: int, world_size: int, folder: str | os.PathLike[str] | None = None) -> None:
        if folder is None:
            folder = os.environ.get(PROGRESS_DIR_ENV) or None
        self.path = Path(folder) / f"rank{rank}.json" if folder is not None else None
        self.state: dict[str, Any] = {"rank": rank, "world_size": world_size, "pid": os.getpid(), "phase": "loading",
                                      "step": 0, "steps": None, "start_step": 0, "denoise_started": None}
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, {**self.state, "time": time.time()})

    def denoising(self, steps: int, start_step: int = 0) -> None:
        """The model is loaded; denoising starts at ``start_step`` (a resumed run) of ``steps``."""
        self.state.update(phase="denoising", steps=steps, step=start_step, start_step=start_step,
                          denoise_started=time.time())
        self._write()

    def step_done(self, index: int) -> None:
        """Denoising step ``index`` (0-based, of the whole schedule) is done."""
        self.state["step"] = index + 1
        self._write()

    def phase(self, name: str) -> None:
        """Enter ``decoding`` or ``done``."""
        if name not in PHASES:
            raise ValueError(f"phase: unknown {name!r}, expected one of {PHASES}")
        self.state["phase"] = name
        self._write()


@dataclass(frozen=True)
class RunProgress:
    """The progress of all ranks together."""

    phase: str
    """The earliest phase any rank is in (``waiting`` when no rank has reported yet)."""
    step: int
    """Denoising steps done by the slowest rank."""
    steps: int | None
    ranks_reporting: int
    world_size: int | None
    seconds_per_step: float | None
    """Mean over this run's steps so far (a resumed run's earlier steps excluded)."""
    eta_s: float | None
    """Seconds of denoising left at that pace (decoding not included)."""
    per_rank: tuple[dict[str, Any], ...] = ()

    def describe(self) -> str:
        """One line, e.g. ``denoising: step 3/10, 1.52 s/step, ~11 s left (2/2 ranks)``."""
        ranks = f"{self.ranks_reporting}/{self.world_size or '?'} ranks"
        if self.phase == "waiting":
            return "starting the ranks"
        if self.phase != "denoising" or self.steps is None:
            done = f", {self.steps}/{self.steps} steps" if self.phase in ("decoding", "done") and self.steps else ""
            return f"{self.phase}{done} ({ranks})"
        pace = f", {self.seconds_per_step:.2f} s/step" if self.seconds_per_step is not None else ""
        left = f", ~{self.eta_s:.0f} s left" if self.eta_s is not None else ""
        return f"denoising: step {self.step}/{self.steps}{pace}{left} ({ranks})"


def read_progress(folder: str | os.PathLike[str]) -> RunProgress:
    """The progress recorded in ``folder`` (files being replaced or unreadable are skipped)."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(folder).glob("rank*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("phase") in PHASES:
            records.append(record)
    if not records:
        return RunProgress("waiting", 0, None, 0, None, None, None)
    records.sort(key=lambda r: int(r.get("rank", 0)))
    world = max(int(r.get("world_size") or 0) for r in records) or None
    phase = min((r["phase"] for r in records), key=PHASES.index)
    if world is not None and len(records) < world:
        phase = "loading"  # a rank that has not reported yet is still starting
    slowest = min(records, key=lambda r: (PHASES.index(r["phase"]), int(r.get("step") or 0)))
    step = int(slowest.get("step") or 0)
    steps = next((int(r["steps"]) for r in records if r.get("steps")), None)
    pace = eta = None
    started, first = slowest.get("denoise_started"), int(slowest.get("start_step") or 0)
    if phase == "denoising" and started is not None and step > first and steps is not None:
        pace = (float(slowest["time"]) - float(started)) / (step - first)
        eta = pace * (steps - step)
    return RunProgress(phase, step, steps, len(records), world, pace, eta, tuple(records))
