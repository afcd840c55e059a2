"""Benchmark scripts refuse arguments they would otherwise ignore while recording them as measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "3", "--configs", "../examples/cpu_demo.json", "../examples/cpu_demo_wan.json"],
     "--seeds N (N >= 1) sweeps one config: pass exactly one --configs FILE"),
    (["--seeds", "0", "--configs", "../examples/cpu_demo_wan.json"], "sweeps one config"),
    (["--engines", 'wan="wan"'], "--engines applies to a --seeds sweep only: add --seeds N"),
])
def test_demo_runs_refuses_what_it_would_ignore(args, message):
    done = subprocess.run([sys.executable, "demo_runs.py", *args], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
