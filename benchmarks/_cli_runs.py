"""The command line as benchmarks run it: in processes of their own, as a user would (``loop.py``,
``demo_runs.py``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> str:
    """``video-infinity ARGS`` in a new process: its standard output; a failure raises with its stderr's end."""
    done = subprocess.run([sys.executable, "-m", "video_infinity.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"video-infinity {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def repository_path(path: Path) -> list[str]:
    """``path`` relative to the repository root, if it lies in it (a measured file), else nothing."""
    resolved = path.resolve()
    return [resolved.relative_to(ROOT).as_posix()] if resolved.is_relative_to(ROOT) else []


def free_port() -> int:
    """A free local port for a run's rendezvous."""
    # Other jobs on a shared machine may take the config's port between the launcher's check and its bind.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
