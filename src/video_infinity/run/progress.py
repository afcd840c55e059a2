"""Live progress of a run, for front-ends (the web UI) and tests: given a status folder
(``video-infinity generate --progress-dir DIR``, or the folder of a ``--request``), every rank keeps
its :class:`~video_infinity.run.contract.ProgressEvent` in ``DIR/rank<r>.json`` up to date, replaced
atomically at each phase and after each denoising step (``phase``: ``loading``, ``denoising``,
``decoding`` or ``done``; times are epoch seconds).

:func:`read_progress` turns the folder into one :class:`RunProgress` (the slowest rank's step,
seconds per step since this run's first step, time left). Imports neither torch nor numpy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .contract import PHASES, ProgressEvent, StatusFolder


class ProgressReporter:
    """One rank's progress file (a no-op when ``folder`` is None)."""

    def __init__(self, rank: int, world_size: int, folder: str | os.PathLike[str] | StatusFolder | None = None) -> None:
        if folder is not None and not isinstance(folder, StatusFolder):
            folder = StatusFolder(Path(folder))
        self.folder = folder
        self.event = ProgressEvent(rank=rank, world_size=world_size, pid=os.getpid(), phase="loading", time=time.time())
        self._write()

    @property
    def path(self) -> Path | None:
        return self.folder.progress_path(self.event.rank) if self.folder is not None else None

    def _update(self, **changes: object) -> None:
        self.event = self.event.model_copy(update={**changes, "time": time.time()})
        self._write()

    def _write(self) -> None:
        if self.folder is not None:
            self.folder.write_progress(self.event)

    def denoising(self, steps: int, start_step: int = 0) -> None:
        """The model is loaded; denoising starts at ``start_step`` (a resumed run) of ``steps``."""
        self._update(phase="denoising", steps=steps, step=start_step, start_step=start_step,
                     denoise_started=time.time())

    def step_done(self, index: int) -> None:
        """Denoising step ``index`` (0-based, of the whole schedule) is done."""
        self._update(step=index + 1)

    def phase(self, name: str) -> None:
        """Enter ``decoding`` or ``done``."""
        if name not in PHASES:
            raise ValueError(f"phase: unknown {name!r}, expected one of {PHASES}")
        self._update(phase=name)


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
    per_rank: tuple[ProgressEvent, ...] = ()

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


def read_progress(folder: str | os.PathLike[str] | StatusFolder) -> RunProgress:
    """The progress recorded in ``folder`` (a file that is not a progress event is skipped)."""
    events = (folder if isinstance(folder, StatusFolder) else StatusFolder(Path(folder))).progress()
    if not events:
        return RunProgress("waiting", 0, None, 0, None, None, None)
    world = max(e.world_size for e in events)
    phase = min((e.phase for e in events), key=PHASES.index)
    if len(events) < world:
        phase = "loading"  # a rank that has not reported yet is still starting
    slowest = min(events, key=lambda e: (PHASES.index(e.phase), e.step))
    steps = next((e.steps for e in events if e.steps), None)
    pace = eta = None
    if phase == "denoising" and slowest.denoise_started is not None and slowest.step > slowest.start_step and steps:
        pace = (slowest.time - slowest.denoise_started) / (slowest.step - slowest.start_step)
        eta = pace * (steps - slowest.step)
    return RunProgress(phase, slowest.step, steps, len(events), world, pace, eta, tuple(events))
