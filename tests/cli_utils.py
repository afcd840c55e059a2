"""Shared helpers for end-to-end tests of ``video-infinity generate``: run it as a user would (a
subprocess), read its one-line errors, and stop a run mid-denoising with a signal.

Two options of ``generate`` make a signal land mid-denoising: every rank records its pid and step
in a folder after each step (``--progress-dir``) and sleeps a little after each step (the hidden,
test-only ``--test-step-sleep``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import ctrl_c_as_in_a_terminal, descendants, still_running

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "video-infinity"), "generate"]


def sets(**values) -> list[str]:
    """``--set`` options for config values (``pipe_configs__steps=4`` sets ``pipe_configs.steps``)."""
    return [x for key, value in values.items() for x in ("--set", f"{key.replace('__', '.')}={json.dumps(value)}")]


def run_cli(config: Path, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``video-infinity generate --config config *args``, to completion."""
    return subprocess.run([*CLI, "--config", str(config), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def our_lines(stderr: str) -> list[str]:
    """The lines the CLI itself wrote (``video-infinity: ...``), progress bars' carriage returns split."""
    lines = [line.strip() for chunk in stderr.splitlines() for line in chunk.split("\r")]
    return [line[line.index("video-infinity: "):] for line in lines if "video-infinity: " in line]


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Assert the run failed with exit ``code`` and one line of ours (no traceback) holding ``words``."""
    assert result.returncode == code, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    ours = our_lines(result.stderr)
    assert len(ours) == 1, result.stderr
    for word in words:
        assert word in ours[0], ours[0]
    return ours[0]


class Interrupted:
    """A run of ``config`` (its ``base_path`` is ``out``) on ``world`` CPU ranks, writing ``name``,
    stopped by signal ``sig`` once every rank has done ``after_step`` denoising steps; with what the
    test saw. ``target``: ``"group"`` (Ctrl-C in a terminal: the whole process group), ``"launcher"``
    or a rank number. A kept checkpoint is copied to ``<config's folder>/<name>-copy.ckpt``."""

    def __init__(self, config: Path, out: Path, env: dict, name: str, world: int, sig: int, target: str,
                 after_step: int, step_sleep_s: float = 0.3) -> None:
        progress = config.parent / f"progress-{name}"
        progress.mkdir()
        self.stem = out / name
        proc = subprocess.Popen(
            [*CLI, "--config", str(config), *sets(devices=["cpu"] * world, pipe_configs__file_name=name),
             "--progress-dir", str(progress), "--test-step-sleep", str(step_sleep_s)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=ctrl_c_as_in_a_terminal)
        try:
            reports = self._wait_for_step(progress, world, after_step, proc)
            self.ranks = {rank: report["pid"] for rank, report in reports.items()}
            self.processes = descendants(proc.pid)
            assert set(self.ranks.values()) <= self.processes  # the ranks are the CLI's descendants
            self.signalled = time.monotonic()
            if target == "group":
                os.killpg(proc.pid, sig)
            elif target == "launcher":
                os.kill(proc.pid, sig)
            else:
                os.kill(self.ranks[int(target)], sig)
            _, self.stderr = proc.communicate(timeout=60)
            self.seconds = time.monotonic() - self.signalled
            self.returncode = proc.returncode
            self.left_behind = still_running(self.processes, within=5.0)
            self.video_written = self.stem.with_suffix(".mp4").exists()
            self.temporary = [p.name for p in out.iterdir() if p.name.startswith(".")]
            self.checkpoint_kept = Path(f"{self.stem}.ckpt").is_file()
            self.copy = config.parent / f"{name}-copy.ckpt"
            if self.checkpoint_kept:
                shutil.copy(f"{self.stem}.ckpt", self.copy)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    @staticmethod
    def _wait_for_step(progress: Path, world: int, step: int, proc: subprocess.Popen) -> dict[int, dict]:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}"
            reports = {}
            for rank in range(world):
                try:
                    reports[rank] = json.loads((progress / f"rank{rank}.json").read_text())
                except (OSError, ValueError):
                    break
            if len(reports) == world and all(r["step"] >= step for r in reports.values()):
                return reports
            time.sleep(0.05)
        raise AssertionError("the ranks did not reach the step in time")

    def result(self) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], self.returncode, "", self.stderr)

    def assert_clean(self) -> None:
        """No process, no video, no temporary file was left; the checkpoint was kept."""
        assert not self.left_behind, self.left_behind
        assert not self.video_written
        assert not self.temporary, self.temporary
        assert self.checkpoint_kept
