"""One generation started from the web UI: ``video-infinity generate --request DIR/request.json`` in a
child process (the CLI's launcher, its pre-flight checks and its supervision of the ranks,
unchanged), followed through the messages of :mod:`video_infinity.run.contract` in ``DIR`` (each
rank's progress, then the run's result or error), and stopped on request.

Running the launcher in its own process keeps torch out of the web server, lets a cancel use the
launcher's own Ctrl-C path (every rank stopped, the last checkpoint kept), and leaves nothing
behind if the server itself dies: the ranks end with their launcher. The run's stdout and stderr
are the server's (a log for people); the UI reads nothing from them.
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
import threading
from pathlib import Path

from ..run.contract import ContractError, ErrorReport, RunRequest, RunResult, StatusFolder
from ..run.progress import RunProgress, read_progress

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 8.0
"""Seconds the launcher gets to stop its ranks after SIGTERM before the whole process group is killed
(its own stop takes about 3 s: SIGTERM to the ranks, then SIGKILL)."""


class GenerationJob:
    """``video-infinity generate --request DIR/request.json`` in a child process, ``DIR`` a fresh folder."""

    def __init__(self, request: RunRequest) -> None:
        self.folder = StatusFolder(Path(tempfile.mkdtemp(prefix="video-infinity-ui-")))
        command = [sys.executable, "-m", "video_infinity.cli", "generate",
                   "--request", str(self.folder.write_request(request))]
        self.cancelled = False
        # Its own session: a cancel can reach the launcher's ranks and fork server as a group.
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        logger.info("started %s (pid %d)", " ".join(command[2:]), self._proc.pid)

    @property
    def returncode(self) -> int | None:
        """None while running."""
        return self._proc.poll()

    def progress(self) -> RunProgress:
        return read_progress(self.folder)

    def wait(self, timeout: float | None = None) -> int:
        return self._proc.wait(timeout)

    def outcome(self) -> RunResult | ErrorReport | None:
        """How the run ended, as it reported it (None: no report, e.g. the launcher was killed); an
        unreadable report becomes an :class:`ErrorReport` saying so."""
        try:
            return self.folder.outcome()
        except ContractError as exc:
            return ErrorReport(message=f"the run's report is unreadable: {exc}", exit_kind="failure",
                               exit_code=self._proc.poll() or 1)

    def cancel(self, wait: bool = True) -> None:
        """Stop the run as Ctrl-C would (every rank stops; the checkpoint is kept); the process group
        is killed if the launcher has not exited within ``CANCEL_GRACE_S``. ``wait=False``: return at
        once, the escalation happening in a background thread (a UI's cancel button must not hold
        its answer until the run has ended, or that answer lands after the run's final status)."""
        if self._proc.poll() is not None:
            return
        self.cancelled = True
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        if wait:
            self._reap()
        else:
            threading.Thread(target=self._reap, name="cancel-reaper", daemon=True).start()

    def _reap(self) -> None:
        try:
            self._proc.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("the launcher did not stop within %.0f s: killing its process group", CANCEL_GRACE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def close(self) -> None:
        """Stop the run if it is still going, and remove its status folder."""
        self.cancel()
        shutil.rmtree(self.folder.path, ignore_errors=True)
