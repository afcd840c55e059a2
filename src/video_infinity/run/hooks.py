"""Test-only hooks of a run, off unless their environment variables are set: they let the
reliability tests stop a run mid-denoising at a known step."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..atomic import write_json_atomic

PROGRESS_ENV = "VIDEO_INFINITY_TEST_PROGRESS"
"""A folder where every rank records ``rank<r>.json`` ({"pid", "step"}) after each step."""
STEP_SLEEP_ENV = "VIDEO_INFINITY_TEST_STEP_SLEEP"
"""Seconds each rank sleeps after each denoising step (to make room for a kill)."""


class TestHooks:
    """The hooks of one rank (see PROGRESS_ENV and STEP_SLEEP_ENV)."""

    __test__ = False  # not a pytest test class

    def __init__(self, rank: int) -> None:
        self.rank = rank
        folder = os.environ.get(PROGRESS_ENV)
        self.folder = Path(folder) if folder else None
        self.sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)

    def step_done(self, index: int) -> None:
        if self.folder is not None:
            write_json_atomic(self.folder / f"rank{self.rank}.json", {"pid": os.getpid(), "step": index + 1})
        if self.sleep:
            time.sleep(self.sleep)
