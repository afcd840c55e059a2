"""The one process harness of the tests: real gloo ranks (``run_distributed``), the thread count of
a reference computed in the test process (``torch_threads``), a free port, the peak of live tensor
bytes during a call (``peak_live_bytes``), and processes seen through /proc (what a run left behind).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from video_infinity.memory import peak_bytes


# Environments in which kernels pick other algorithms by shape: a frame's bits must still not depend
# on which other frames its rank holds. name -> (environment of the rank processes, torch threads per rank).
BLAS_ENVIRONMENTS: dict[str, tuple[dict[str, str], int]] = {
    "mkl_cbwr_compatible": ({"MKL_CBWR": "COMPATIBLE"}, 1),
    "mkl_avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1),
    "two_threads_per_rank": ({}, 2),  # torch.set_num_threads sets OpenMP's and MKL's thread counts
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads: a reference computed in the test process must use
    the thread count of the ranks it is compared with (small products round by thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Imported once by the test session's fork server, so that a rank starts in a fraction of a second
# instead of importing torch and diffusers anew (what the launcher does for the same reason).
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "diffusers", "video_infinity.pipeline", "harness", "tiny_models"]


def _fork_ranks(world_size: int, *launch: Any) -> None:
    """The ranks of a run with its own environment, forked from a fresh interpreter started with it
    once that has loaded torch and the test's modules: one import per environment, not one per rank."""
    mp.start_processes(_worker, args=(world_size, *launch), nprocs=world_size, start_method="fork")


def run_distributed(fn: Callable, world_size: int, *args: Any, tmp_dir: Path, threads: int = 1,
                    env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real gloo processes with ``threads`` torch
    threads each and ``env`` added to their environment (read by MKL/oneDNN when they start, e.g.
    ``MKL_CBWR``: such runs fork from a freshly spawned interpreter); return each rank's result."""
    out_dir = Path(tmp_dir) / f"world{world_size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})  # spawned processes inherit the environment at start
    launch = (world_size, free_port(), fn, args, str(out_dir), threads)
    try:
        if env:
            # A fresh interpreter: MKL and oneDNN read their environment (MKL_CBWR, ...) when they
            # load, and the fork server has loaded them already.
            launcher = mp.get_context("spawn").Process(target=_fork_ranks, args=launch)
            launcher.start()
            launcher.join()
            if launcher.exitcode != 0:
                raise RuntimeError(f"the ranks' launcher exited with code {launcher.exitcode}")
        else:
            context = mp.get_context("forkserver")
            context.set_forkserver_preload(_FORKSERVER_PRELOAD)  # takes effect when the server first starts
            mp.start_processes(_worker, args=launch, nprocs=world_size, start_method="forkserver")
    except Exception as exc:  # surface the worker's own traceback
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.err")))
        raise AssertionError(f"distributed run failed:\n{errors}") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def peak_live_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes of tensors created by ``fn()`` alive at once (the package's own counter)."""
    return peak_bytes(fn)


# ---------------------------------------------------------------- processes seen through /proc (Linux)
def ctrl_c_as_in_a_terminal() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: SIGINT handled by default in the child, as in a terminal.
    A test session started in the background of a non-interactive shell (``make test &``) ignores
    SIGINT, and a child would inherit that (Python installs no Ctrl-C handler then)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def still_running(pids: set[int], within: float = 2.0) -> list[str]:
    """The command lines of ``pids`` still running ``within`` seconds from now (zombies count as gone)."""
    deadline = time.monotonic() + within
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {pid for pid in alive if state(pid) not in (None, "Z")}
    names = []
    for pid in alive:
        try:
            names.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:100]!r}")
        except OSError:
            pass
    return names
