"""Where one Wan2.1-1.3B-size call spends its GPU time: diffusers against the engine's variants, kernel by kernel.

``gpu_wan.json`` left two questions open on one H200: the engine with a whole-clip window took 1.13x
diffusers' time (target 1.05x), and the ``wan`` preset with ``attn.kernel: flex`` was 1.06x slower than
with the per-frame calls although its band attention is 1.34-1.39x faster per layer
(``band_attention.json``). This script profiles one call of each variant (``torch.profiler``, CUDA
activity, after ``--warmup`` untimed calls) and records, per variant: the wall time of the profiled
call, the summed kernel time, the number of kernels, the wall time not covered by kernels (the GPU
waiting for the host: launches, Python, host-device waits), and the ``--top`` kernels by time. The
variants: diffusers; the engine with a whole-clip window (frame-chunked blocks at the default,
``block_tokens: auto``, one chunk here; null; 16,384 tokens, the earlier default: three chunks); the
``wan`` preset with ``attn.kernel`` sdpa and flex.

The transformer is ``gpu_wan.py``'s (Wan2.1-T2V-1.3B's configuration, random weights, bf16, 480x832,
81 frames, batch 1, 512 text tokens, timestep 500). Needs a CUDA GPU; ``--smoke`` checks the script on
CPU at ``gpu_wan.py``'s small CPU size (CPU activity; figures meaningless) and writes nothing.

    python benchmarks/gpu_profile.py [--frames 81] [--warmup 2] [--top 12]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from _common import WAN_ENGINE, machine, setup_logging, write_result
from _gpu import copy_labels, parse_gpu_args

logger = logging.getLogger("gpu_profile")
MEASURES = WAN_ENGINE


def variants() -> dict[str, Any]:
    from gpu_wan import WHOLE_WINDOW
    from video_infinity.presets import PRESETS

    preset = PRESETS["wan"]
    return {"diffusers": None, "engine_whole_window": WHOLE_WINDOW,
            "engine_whole_window_unchunked": {**WHOLE_WINDOW, "block_tokens": None},
            "engine_whole_window_16384_tokens": {**WHOLE_WINDOW, "block_tokens": 16384},
            "engine_wan_preset_sdpa": {**preset, "attn": {**preset["attn"], "kernel": "sdpa"}},
            "engine_wan_preset_flex": {**preset, "attn": {**preset["attn"], "kernel": "flex"}}}


def profile(model: Any, inputs: tuple[Any, ...], settings: Any, warmup: int, top: int, device: str) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity
    from video_infinity import parallelize
    from video_infinity.context import ClipContext

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    handle = None if settings is None else parallelize(model, settings, ClipContext())
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(*inputs)
            sync()
            activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
            with torch.profiler.profile(activities=[activity]) as prof:
                start = time.perf_counter()
                model(*inputs)
                sync()
                wall = time.perf_counter() - start
    finally:
        if handle is not None:
            handle.remove()
    events = prof.key_averages()

    def busy(event: Any) -> float:
        return (event.device_time_total if device == "cuda" else event.self_cpu_time_total) / 1e6

    kernel_seconds = sum(busy(e) for e in events)
    ranked = sorted(events, key=busy, reverse=True)[:top]
    return {"wall_seconds": round(wall, 5), "kernel_seconds": round(kernel_seconds, 5),
            "kernels": sum(e.count for e in events), "uncovered_seconds": round(wall - kernel_seconds, 5),
            "top": [{"name": e.key[:160], "seconds": round(busy(e), 5), "count": e.count} for e in ranked]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the profiled one")
    parser.add_argument("--top", type=int, default=12, help="kernels kept per variant")
    args = parse_gpu_args(parser)
    setup_logging()
    import importlib

    # The package before diffusers: on the lent machine (transformers 5.17) diffusers' Wan import failed
    # the other way round, as a diagnostic script found on 12-04.
    importlib.import_module("video_infinity")
    from gpu_wan import Runner
    from video_infinity.families.wan.vae import latent_frame_count

    # gpu_wan.py's transformer and inputs (its small CPU layout for --smoke).
    runner = Runner(args.smoke, *((64, 64) if args.smoke else (480, 832)), text_tokens=512)
    model, device, latent_frames = runner.model, runner.device, latent_frame_count(args.frames)
    inputs = (runner.sample(latent_frames), runner.timestep, runner.text)
    rows = {}
    for name, settings in variants().items():
        if args.smoke and name.endswith("flex"):
            settings = {**settings, "split_invariant": False}  # CPU's default, split-invariant, never uses flex
        rows[name] = profile(model, inputs, settings, 1 if args.smoke else args.warmup, args.top, device)
        row = rows[name]
        logger.info("%-30s wall %.3f s, kernels %.3f s (%d), uncovered %.3f s; top: %s", name, row["wall_seconds"],
                    row["kernel_seconds"], row["kernels"], row["uncovered_seconds"],
                    "; ".join(f"{k['name'][:40]} {k['seconds']:.3f}" for k in row["top"][:3]))
    if args.smoke:
        logger.info("smoke run: nothing written")
        return 0
    info = machine()
    write_result("gpu_profile", {
        "what": "one Wan2.1-1.3B-size transformer call profiled kernel by kernel: diffusers against the engine's "
                "whole window (chunked, unchunked) and the wan preset (attn.kernel sdpa, flex)",
        "model": "Wan2.1-T2V-1.3B configuration, random weights", "config": runner.config,
        "dtype": str(runner.dtype), "height": runner.latent[0] * 8, "width": runner.latent[1] * 8,
        "frames": args.frames, "latent_frames": latent_frames,
        "warmup": args.warmup, "machine": info, "variants": rows,
    }, MEASURES, copy_labels(args.commit, info.get("gpu"), "gpu_profile.py"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
