"""The web UI under test: ``video-infinity serve`` started as a user would (a subprocess), and
headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness import ctrl_c_as_in_a_terminal, descendants, free_port, still_running

CHROMIUM = os.environ.get("VIDEO_INFINITY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes say: without these, Chromium keeps dialling Google's hosts on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REQUIRE_BROWSER_ENV = "VIDEO_INFINITY_REQUIRE_BROWSER"
"""Set (as .ci/run does): a missing browser fails the browser tests instead of skipping them."""


def require_browser() -> None:
    """Skip (or fail, in CI) when Chromium or Playwright is not installed."""
    problem = None
    if not Path(CHROMIUM).is_file():
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is not installed (pip install playwright)"
    if problem is not None:
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(problem)
        pytest.skip(problem)


class Server:
    """``video-infinity serve`` in a subprocess, on a free port, until :meth:`stop`."""

    def __init__(self, base: Path, env: dict[str, str], *args: str, timeout: float = 90) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = base.parent / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "video_infinity.cli", "serve", "--base-path", str(base), "--port", str(self.port),
                 *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=ctrl_c_as_in_a_terminal)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def runs_left(self) -> list[str]:
        """Processes the server started that are still running (its generations and their ranks)."""
        return still_running(descendants(self.proc.pid), within=5.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
