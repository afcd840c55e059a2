"""Helpers shared by the benchmark scripts (not a benchmark itself).

Benchmarks import the library and never copy it; what lives here is only benchmark plumbing: the
UNet configurations the benchmarks time, the one writer of result files (``write_result``: every
result labelled with its commit, machine, command line, environment knobs and the files it
measures), peak memory probes, real multi-process gloo runs, and a helper for interleaved timings.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("VIDEO_INFINITY_BENCH_RESULTS") or ROOT / "benchmarks" / "results").resolve()
"""Where results go; the variable points a check of a script elsewhere (the committed files stay)."""

# What the figures depend on, by part (``write_result``'s ``measures``; the other repository files the
# run imported are listed apart, as ``imported``). Folders stand for every file in them.
ENGINE_CORE = ("src/video_infinity/engine", "src/video_infinity/parallel.py", "src/video_infinity/config.py",
               "src/video_infinity/presets.py", "src/video_infinity/context.py", "src/video_infinity/frames.py",
               "src/video_infinity/families/__init__.py", "src/video_infinity/families/base.py")
UNET3D_ENGINE = (*ENGINE_CORE, "src/video_infinity/families/unet3d")
WAN_ENGINE = (*ENGINE_CORE, "src/video_infinity/families/wan", "src/video_infinity/memory.py")
ANIMATEDIFF_ENGINE = (*ENGINE_CORE, "src/video_infinity/families/animatediff")
PIPELINE = ("src/video_infinity/pipeline.py", "src/video_infinity/denoise.py", "src/video_infinity/noise.py",
            "src/video_infinity/schedulers.py", "src/video_infinity/prompts.py", "src/video_infinity/request.py",
            "src/video_infinity/families/folder.py")
DEMO_MODEL = ("src/video_infinity/demo/__init__.py", "src/video_infinity/demo/data.py",
              "src/video_infinity/demo/random_model.py", "src/video_infinity/demo/weights")
PROBE = ("src/video_infinity/demo/probe.py", "src/video_infinity/video_io.py")
CLI = ("src/video_infinity/cli.py", "src/video_infinity/run")

ENGINE_WHOLE_WINDOW = {"attn": {"padding": 64, "top_k": 0, "local_phase": None, "global_phase": None}}
"""Engine settings whose window covers any clip of <= 65 frames: no global frames, no phase biases.
On one process this is the same computation as the unmodified model (the overhead target's case)."""

ENGINE_WHOLE_WINDOW_FUSED = {**ENGINE_WHOLE_WINDOW, "split_invariant": False}
"""The same with fused kernels (the GPU default) instead of the split-invariant computation (the CPU
default: every frame computed by operations whose shapes are fixed by that frame alone, which
makes videos bit-identical on any number of ranks)."""

ENGINE_DEFAULT: dict[str, Any] = {}
"""The published dual-scope defaults (padding 8, top_k 16, phase biases +10 at t 800)."""

BENCH_UNET = dict(
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(64, 128),
    layers_per_block=1,
    norm_num_groups=32,
    cross_attention_dim=64,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
)
"""A moderate UNet3DConditionModel (6.3 M parameters, 2 levels) whose CPU timings mean something."""

VIDEOCRAFTER2_UNET = dict(
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=64,
    norm_num_groups=32,
    in_channels=4,
    out_channels=4,
)
"""VideoCrafter2's UNet (``adamdad/videocrafterv2_diffusers``), without the fps MLP (FpsUNet3DConditionModel adds it)."""

TEXT_TOKENS = 77
"""Text sequence length of the random prompt embeddings (CLIP's)."""

logger = logging.getLogger("benchmarks")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "video_infinity"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_unet(config: dict[str, Any], sample_size: int, seed: int = 0, fps: bool = False, device: str = "cpu",
               dtype: Any = None) -> Any:
    """A UNet3DConditionModel (or the fps-conditioned VideoCrafter2 class) with random weights, in eval mode."""
    import torch
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    if fps:
        from video_infinity.families.unet3d.model import FpsUNet3DConditionModel

        cls, extra = FpsUNet3DConditionModel, {"fps_cond": True}
    else:
        cls, extra = UNet3DConditionModel, {}
    default = torch.get_default_dtype()
    try:
        # Created directly in ``dtype`` on ``device``: no full-precision copy, no cast afterwards.
        torch.set_default_dtype(dtype or default)
        with torch.device(device):
            unet = cls(sample_size=sample_size, **config, **extra)
    finally:
        torch.set_default_dtype(default)
    return unet.eval().requires_grad_(False)


def machine() -> dict[str, Any]:
    """What the figures were measured on (CPU model and cores, versions, threads, GPU, load average now)."""
    from video_infinity.demo.provenance import machine as describe

    return describe()


def bench_inputs(seed: int, frames: int, latent: int, batch: int, device: str = "cpu") -> tuple[Any, Any]:
    """Random (sample, text) inputs for BENCH_UNET: (batch, 4, frames, latent, latent) and text tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, frames, latent, latent, generator=generator).to(device)
    text = torch.randn(batch, TEXT_TOKENS, BENCH_UNET["cross_attention_dim"], generator=generator).to(device)
    return sample, text


def command_line() -> str:
    """This process's command line as run from the repository root (``python benchmarks/x.py ...``)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else str(script)
    return shlex.join(["python", shown, *sys.argv[1:]])


def write_result(name: str, payload: dict[str, Any], measures: Sequence[str],
                 labels: dict[str, Any] | None = None) -> Path:
    """Write ``RESULTS/<name>.json`` atomically, labelled (see ``video_infinity.demo.provenance``): commit,
    time, command line, machine (``payload["machine"]`` if given: it holds the load average at the
    start), environment knobs, ``measures``: the calling script and ``measures`` (files or folders
    relative to the repository root), and ``imported``: the other repository files this process and
    its ``run_ranks`` processes imported. ``labels`` replaces the label fields (a merge of results measured elsewhere).
    Returns the path."""
    from video_infinity.demo.provenance import labels as make_labels

    script = Path(sys.argv[0]).resolve()
    declared = [*([script.relative_to(ROOT).as_posix()] if script.is_relative_to(ROOT) else []), *measures]
    record = {**payload, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              **make_labels(ROOT if (ROOT / ".git").exists() else None, command_line(), declared,
                            extra=_RANK_FILES, machine_info=payload.get("machine")),
              **(labels or {})}
    from video_infinity.atomic import write_json_atomic  # after the labels: writing is not what was measured

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, record)
    logger.info("wrote %s (commit %s)", path, record["commit"][:12])
    if record.get("uncommitted_measures"):
        logger.warning("the figures measure uncommitted changes to %s: commit them and re-run for a current result",
                       record["uncommitted_measures"])
    return path


# ------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a region above its start: CUDA ``max_memory_allocated``, or on CPU the
    process's RSS high-water mark (reset through ``/proc/self/clear_refs``) minus the RSS at start.

    CPU figures are only meaningful in a fresh process whose allocator holds no freed memory of an
    earlier, larger computation: run each variant in its own subprocess.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _status_kib("VmHWM") * 1024

    @property
    def delta(self) -> int:
        return self.peak - self.base


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Wall-clock seconds of ``fn()`` (synchronising CUDA before and after)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: str = "cpu",
                on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Time every variant once per round, ``repeats`` rounds (after ``warmup`` untimed rounds), rotating
    the order each round so that no variant always runs first or after the same neighbour."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(variants[name], device))
        if on_round is not None:
            on_round(r)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio (robust to slow phases of a shared machine)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ------------------------------------------------------------------------------------------------
# Real multi-process runs (gloo on CPU)
# ------------------------------------------------------------------------------------------------


_RANK_FILES: set[str] = set()
"""Repository files the ``run_ranks`` processes imported (the parent may never import the engine)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, default=str))
        if (ROOT / ".git").exists():  # what this rank ran, for the result's ``measures``
            from video_infinity.demo.provenance import imported_files

            Path(out_dir, f"rank{rank}.files").write_text("\n".join(sorted(imported_files(ROOT))))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes (``threads`` torch
    threads each); returns each rank's JSON-serialisable result. ``fn`` must be a module-level function."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vi-bench-") as out_dir:
        try:
            mp.start_processes(_rank_main, args=(world_size, free_port(), threads, fn, args, out_dir),
                               nprocs=world_size, start_method="spawn")
        except Exception as exc:
            errors = "\n".join(p.read_text() for p in sorted(Path(out_dir).glob("*.err")))
            raise RuntimeError(f"distributed run failed:\n{errors}") from exc
        for files in Path(out_dir).glob("rank*.files"):
            _RANK_FILES.update(files.read_text().split())
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def largest_fitting(fits: Callable[[int], tuple[bool, float | str]], start: int, max_frames: int, budget_s: float,
                    resolution: Callable[[int], int] = lambda ok: 1, unit: str = "frames") -> dict[str, Any]:
    """The largest frame count for which ``fits(frames)`` holds: doubling from ``start``, then bisection
    until the gap to the smallest failing count is at most ``resolution(largest fitting)``, within
    ``budget_s`` seconds. ``fits`` returns (whether it fit, seconds or the failure's description)."""
    began = time.perf_counter()
    tried: dict[int, float | str] = {}
    ok, bad = 0, None
    frames = start

    def attempt(count: int) -> bool:
        fit, seconds = fits(count)
        tried[count] = seconds
        logger.info("  %5d %s: %s", count, unit, f"{seconds:.2f} s" if fit else seconds)
        return fit

    while frames <= max_frames and time.perf_counter() - began < budget_s:
        if not attempt(frames):
            bad = frames
            break
        ok = frames
        if frames == max_frames:
            break
        frames = min(frames * 2, max_frames)
    while bad is not None and bad - ok > resolution(ok) and time.perf_counter() - began < budget_s:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if attempt(mid) else (ok, mid)
    complete = bad is not None and bad - ok <= resolution(ok)
    return {"largest_fitting": ok, "smallest_failing": bad, "search_complete": complete or ok == max_frames,
            "capped_at_max_frames": bad is None and ok == max_frames, "tried_seconds": tried,
            "search_seconds": time.perf_counter() - began}
