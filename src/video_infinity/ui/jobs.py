"""One generation started from the web UI: ``video-infinity generate`` in a child process (the CLI's
launcher, its pre-flight checks and its supervision of the ranks, unchanged), watched through the
ranks' progress files, and stopped on request.

Running the launcher in its own process keeps torch out of the web server, lets a cancel use the
launcher's own Ctrl-C path (every rank stopped, the last checkpoint kept), and leaves nothing
behind if the server itself dies: the ranks end with their launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..run.progress import RunProgress, read_progress

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 8.0
"""Seconds the launcher gets to stop its ranks after SIGTERM before the whole process group is killed
(its own stop takes about 3 s: SIGTERM to the ranks, then SIGKILL)."""


class GenerationJob:
    """``video-infinity generate --config CONFIG [--resume CHECKPOINT]`` in a child process."""

    def __init__(self, config_path: Path, *, resume: Path | None = None, env: dict[str, str] | None = None) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="video-infinity-ui-"))
        self.progress_dir = self._folder / "progress"
        self.progress_dir.mkdir()
        self._stderr_path = self._folder / "stderr.txt"
        command = [sys.executable, "-m", "video_infinity.cli", "generate", "--config", str(config_path),
                   "--progress-dir", str(self.progress_dir)]
        if resume is not None:
            command += ["--resume", str(resume)]
        run_env = {**os.environ, **(env or {})}
        self.cancelled = False
        with open(self._stderr_path, "wb") as stderr:
            # Its own session: a cancel can reach the launcher's ranks and fork server as a group.
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                          env=run_env, start_new_session=True)
        logger.info("started %s (pid %d)", " ".join(command[2:]), self._proc.pid)

    @property
    def returncode(self) -> int | None:
        """None while running."""
        return self._proc.poll()

    def progress(self) -> RunProgress:
        return read_progress(self.progress_dir)

    def wait(self, timeout: float | None = None) -> int:
        return self._proc.wait(timeout)

    def cancel(self) -> None:
        """Stop the run as Ctrl-C would (every rank stops; the checkpoint is kept); the process group
        is killed if the launcher has not exited within ``CANCEL_GRACE_S``."""
        if self._proc.poll() is not None:
            return
        self.cancelled = True
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("the launcher did not stop within %.0f s: killing its process group", CANCEL_GRACE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def error_line(self) -> str:
        """The launcher's one-line message (``video-infinity: error: ...``), or its last line."""
        try:
            lines = [line.strip() for line in self._stderr_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        ours = [line for line in lines if line.startswith("video-infinity:")]
        return (ours or lines or [""])[-1].removeprefix("\r\x1b[K")

    def close(self) -> None:
        """Stop the run if it is still going, and remove its progress folder."""
        self.cancel()
        shutil.rmtree(self._folder, ignore_errors=True)
