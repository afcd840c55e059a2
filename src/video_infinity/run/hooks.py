"""Test-only hook of a run, off unless its environment variable is set: it slows the denoising
down so that the reliability and web UI tests can stop a run mid-way at a known step (they watch
the steps through :mod:`video_infinity.run.progress`)."""

from __future__ import annotations

import os
import time

STEP_SLEEP_ENV = "VIDEO_INFINITY_TEST_STEP_SLEEP"
"""Seconds each rank sleeps after each denoising step (to make room for a kill)."""


def step_sleep_s() -> float:
    """The sleep after each step (0: the variable is unset)."""
    return float(os.environ.get(STEP_SLEEP_ENV) or 0)
