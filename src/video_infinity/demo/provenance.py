"""What a result file was made with: commit, time, machine, command line, the environment knobs that
change the figures, and ``measures``: the repository files the figures depend on.

Shared by :mod:`video_infinity.demo.evaluate` and the repository's ``benchmarks/`` scripts (they
import the package, never the other way round). ``tests/test_results_labels.py`` reads these fields
back: a result file fails it when a file it measures changed after the commit it records.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ENVIRONMENT_KNOBS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO", "NCCL_PROTO",
)
"""Variables that change speed or bits of the same code (thread counts, BLAS and oneDNN code paths,
which GPUs, allocator): recorded with ``None`` when unset, so that "unset" is on record too."""

OUTPUTS = "benchmarks/results"
"""Result files are outputs: a run that rewrites them does not make the next one's checkout "+changes"."""

NOT_MEASURED = ("src/video_infinity/demo/provenance.py", "src/video_infinity/demo/__init__.py")
"""Imported by every writer (this module, and its package on the way) to label the figures: not
counted as measured when found imported (a writer that uses the demo package names it itself)."""


def repository_root() -> Path | None:
    """The git checkout this package runs from (an editable install), or None (a wheel, a tarball)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / ".git").exists() and (root / "src" / "video_infinity").is_dir() else None


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def commit(root: Path | None) -> str:
    """HEAD, with ``+changes`` when tracked files outside the results differ from it; "unknown"
    without git history."""
    head = _git(root, "rev-parse", "HEAD") if root is not None else None
    if not head:
        return "unknown"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){OUTPUTS}")
    return head.strip() + ("+changes" if dirty and dirty.strip() else "")


def uncommitted(root: Path, paths: Sequence[str]) -> list[str]:
    """Which of ``paths`` (files or folders) differ from HEAD or are new: the figures then describe
    code no commit holds."""
    if not paths:
        return []
    changed = _git(root, "diff", "--name-only", "HEAD", "--", *paths) or ""
    new = _git(root, "ls-files", "--others", "--exclude-standard", "--", *paths) or ""
    # A Markdown file (a model folder's README) changes no figure: tests/test_results_labels.py's rule.
    return sorted(p for p in set(changed.split()) | set(new.split()) if not p.endswith(".md"))


def imported_files(root: Path) -> set[str]:
    """The repository's tracked files this process imported (paths relative to ``root``)."""
    tracked = set((_git(root, "ls-files") or "").splitlines())
    found = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        try:
            relative = Path(file).resolve().relative_to(root).as_posix()
        except ValueError:
            continue
        if relative in tracked:
            found.add(relative)
    return found


def measured_files(root: Path | None, declared: Iterable[str]) -> list[str]:
    """``declared``: files or folders relative to ``root`` (each must exist), what the figures depend on.

    Declared, not every file the run imported: an import (the CLI, the web UI, a docstring's module)
    is not a dependence of a timing or a memory figure, and counting it would mark every result
    stale at every commit. ``imported`` in the labels lists the rest, for the record."""
    declared = sorted({str(p).rstrip("/") for p in declared})
    if root is not None:
        missing = [p for p in declared if not (root / p).exists()]
        if missing:
            raise ValueError(f"measures: {missing} not in the repository at {root}")
    return declared


def other_imports(root: Path | None, measures: Sequence[str], extra: Iterable[str] = ()) -> list[str]:
    """The repository files this process (and ``extra``: its ranks') imported that ``measures`` does
    not cover: informational."""
    if root is None:
        return []
    found = (imported_files(root) | set(extra)) - set(NOT_MEASURED)
    return sorted(p for p in found if p not in measures and not any(p.startswith(f + "/") for f in measures))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and cores, library versions, threads, GPU."""
    import torch

    info: dict[str, Any] = {
        "host_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.is_available(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    return info


def environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ENVIRONMENT_KNOBS}


def labels(root: Path | None, command: str, declared: Iterable[str], extra: Iterable[str] = (),
           machine_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The label fields of a result file (``machine_info``: the machine as recorded at the start of
    the run, with its load average then; measured now otherwise)."""
    measures = measured_files(root, declared)
    return {
        "commit": commit(root),
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
        "machine": machine_info if machine_info is not None else machine(),
        "environment": environment(),
        "measures": measures,
        "uncommitted_measures": uncommitted(root, measures) if root is not None else None,
        "imported": other_imports(root, measures, extra),
    }
