"""Process supervision for the built-in launcher: one process per device, watched.

When a rank raises or dies (even by SIGKILL), the others are stopped at once (they may be blocked in
a collective that would only time out much later), and one line names the rank and its error (the
root cause, not its echoes in the other ranks). Ctrl-C (SIGINT) or SIGTERM stops every rank the
same way. A rank also ends itself as soon as the launcher is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import is_temp_of, write_json_atomic
from ..errors import RunError
from .checkpoint import CheckpointPlan
from .config import RunConfig
from .contract import RunChannel
from .failures import describe_failure

logger = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""Seconds a stopped rank gets to exit after SIGTERM before it is killed (SIGKILL)."""

_FORKSERVER_PRELOAD = ("video_infinity.pipeline", "video_infinity.run.rank")


class Terminated(KeyboardInterrupt):
    """SIGTERM received by the launcher (handled like Ctrl-C)."""


def rendezvous_socket(preferred: int) -> socket.socket:
    """A listening socket for the ranks' rendezvous store, on ``preferred`` when free, else on a port
    the OS picks. The launcher holds it from the start and hands it to rank 0, so no other run can
    take the port between the choice and the store's start (two launchers that merely checked a port
    both picked it, and one failed with EADDRINUSE)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As the store does: a port whose last run's connections linger in TIME_WAIT is free to listen on
    # (on Linux this still lets only one socket listen on a port).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", preferred))
    except OSError:
        sock.bind(("127.0.0.1", 0))
        logger.warning("master_port %d is taken: using %d", preferred, sock.getsockname()[1])
    sock.listen()
    return sock


def _exit_with_launcher(launcher: int) -> None:
    """Kill this rank as soon as the launcher process is gone (e.g. killed with -9).

    The ranks are children of the fork server, which itself lives as long as any rank does, so
    neither a parent-death signal nor the fork server would stop them: a thread watches the
    launcher (a pidfd on Linux, else polling).
    """
    import select
    import threading

    try:
        pidfd: int | None = os.pidfd_open(launcher)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the launcher has exited
        else:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(launcher, 0)
                except ProcessLookupError:
                    break
                except OSError:
                    continue
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _spawned_rank(rank: int, world_size: int, rendezvous: socket.socket | None, port: int, config: RunConfig,
                  model: str, paths: dict[str, Path], plan: CheckpointPlan, log_level: int, report_dir: str,
                  launcher: int, channel: RunChannel) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the launcher stops us
    _exit_with_launcher(launcher)
    import threading

    import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which a rank that ends with os._exit would
    # leak (and the resource tracker would complain about); the ranks need only a thread lock.
    tqdm.tqdm.set_lock(threading.RLock())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    from .rank import configure_rank_logging, device_name, run_rank  # torch: in the rank only

    configure_rank_logging(rank, log_level)
    try:
        run_rank(rank, world_size, rank, config, model, paths, world_size, plan, channel,
                 store_port=port, store_socket=rendezvous)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which stops everyone
        kind, message, code = describe_failure(exc, config, world_size, device_name(config, rank))
        try:
            write_json_atomic(Path(report_dir) / f"rank{rank}.json", {"kind": kind, "message": message, "code": code,
                                                                 "time": time.time()})
        finally:
            logger.debug("rank %d failed", rank, exc_info=True)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # no interpreter teardown: it could wait on peers that will never answer


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def root_cause(procs: list[Any], stopped: set[int], report_dir: Path) -> tuple[str, int, int | None]:
    """The one-line message, exit code and rank of the failure that brought the run down."""
    reports: dict[int, dict[str, Any]] = {}
    for rank in range(len(procs)):
        try:
            reports[rank] = json.loads((report_dir / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            continue
    candidates: list[tuple[int, float, str, int, int]] = []
    for rank, proc in enumerate(procs):
        report = reports.get(rank)
        code = proc.exitcode
        if report is not None and report.get("kind") != "peer":
            kind, message = report["kind"], report["message"]
            if kind == "user":
                text = message
            elif kind == "oom":
                text = f"rank {rank} {message}"
            else:
                text = f"rank {rank} failed: {message}"
            candidates.append((0, report.get("time", 0.0), text, int(report.get("code", 1)), rank))
        elif code is not None and code < 0 and rank not in stopped:
            candidates.append((1, 0.0, f"rank {rank} was killed ({_signal_name(code)})", 1, rank))
        elif report is not None:
            candidates.append((2, report.get("time", 0.0), f"rank {rank} failed: {report['message']}", 1, rank))
        elif code not in (None, 0) and rank not in stopped:
            candidates.append((3, 0.0, f"rank {rank} exited with code {code}", 1, rank))
    if not candidates:
        return "a rank failed without a report", 1, None
    _, _, text, code, rank = min(candidates, key=lambda c: (c[0], c[1]))
    return text, code, rank


def _stop(procs: list[Any]) -> set[int]:
    """Stop every rank still running (SIGTERM, then SIGKILL after STOP_GRACE_S); the ranks it stopped."""
    stopped = set()
    for rank, proc in enumerate(procs):
        if proc.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGTERM)
            stopped.add(rank)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
    return stopped


def _stop_forkserver() -> None:
    """End the fork server now: left alone, it lingers after this process exits (its interpreter
    teardown, with torch and diffusers loaded, takes about a second)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        if server._forkserver_pid is not None:
            os.kill(server._forkserver_pid, signal.SIGKILL)  # it holds nothing worth a clean exit
        server._stop()


def _watch(procs: list[Any]) -> bool:
    """Wait until every rank has exited (True) or one has failed (False)."""
    from multiprocessing.connection import wait

    running = set(range(len(procs)))
    while running:
        wait([procs[rank].sentinel for rank in running], timeout=1.0)
        failed = False
        for rank in sorted(running):
            code = procs[rank].exitcode
            if code is not None:
                running.discard(rank)
                failed = failed or code != 0
        if failed:
            return False
    return True


def run_spawned(config: RunConfig, model: str, paths: dict[str, Path], plan: CheckpointPlan,
                channel: RunChannel | None = None) -> None:
    import multiprocessing

    world_size = config.world_size
    # forkserver: the heavy imports happen once, in the server, instead of once per rank (spawn);
    # unlike fork, no rank inherits this process's threads or CUDA state.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
    rendezvous = rendezvous_socket(config.master_port) if world_size > 1 else None
    port = rendezvous.getsockname()[1] if rendezvous is not None else config.master_port
    report_dir = Path(tempfile.mkdtemp(prefix="video-infinity-ranks-"))
    procs: list[Any] = []
    ok = False
    try:
        for rank in range(world_size):
            proc = context.Process(
                target=_spawned_rank, name=f"video-infinity-rank{rank}",
                args=(rank, world_size, rendezvous if rank == 0 else None, port, config, model, paths, plan,
                      logging.getLogger().level or logging.INFO,
                      str(report_dir), os.getpid(), channel or RunChannel()),
            )
            proc.start()
            procs.append(proc)
        ok = _watch(procs)
    finally:
        with signals_deferred():
            if rendezvous is not None:
                rendezvous.close()  # rank 0 holds its own copy
            started = time.monotonic()
            stopped = _stop(procs)
            message, code, failed_rank = ("", 0, None) if ok else root_cause(procs, stopped, report_dir)
            shutil.rmtree(report_dir, ignore_errors=True)
            stopped_at = time.monotonic()
            _stop_forkserver()
            logger.debug("ranks stopped in %.2f s, fork server in %.2f s", stopped_at - started,
                         time.monotonic() - stopped_at)
    if not ok:
        raise RunError(message, code, failed_rank)


# --------------------------------------------------------------------------------------------------
# Signals and temporary files


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up (a second Ctrl-C must not leave ranks or files behind)."""
    if not _main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    if not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def temp_files(paths: dict[str, Path]) -> set[Path]:
    """The temporary files beside the outputs (:func:`video_infinity.atomic.temp_path`: partial MP4s,
    JSON, latents, checkpoints)."""
    found: set[Path] = set()
    for path in paths.values():
        if path.parent.is_dir():
            found.update(p for p in path.parent.glob(f".{path.name}.*") if is_temp_of(p, path))
    return found


def remove_new_temp_files(paths: dict[str, Path], before: set[Path]) -> None:
    for path in temp_files(paths) - before:
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def checkpoint_note(plan: CheckpointPlan) -> str:
    if plan.path.is_file():
        return f"the last checkpoint is kept: continue with --resume {plan.path}"
    if plan.resume is not None:
        return f"the checkpoint it resumed from is kept: continue with --resume {plan.resume}"
    if plan.every is None:
        return "no checkpoint (set pipe_configs.checkpoint_every to keep the progress of long runs)"
    return "no checkpoint was saved yet"
