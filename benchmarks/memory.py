"""Peak memory: per rank it stays flat as the video grows with frames per rank fixed; on one process,
long-video temporal attention memory is linear in frames.

1. Every world size (default 1, 2, 4 gloo processes; 16 frames per rank, so 16, 32, 64 frames in
   all) runs one UNet call (CFG batch 2, engine defaults) per rank in fresh processes; each rank
   records its peak working memory during the call (RSS high-water mark above the RSS before it on
   CPU, reset through /proc/self/clear_refs after a tiny warm-up; ``max_memory_allocated`` on CUDA).
   For contrast, one process holding the whole video (the same totals) is measured the same way.
2. Single-process dual-scope temporal attention at 64..512 frames: ``attention_memory.py`` (run
   with its defaults, its JSON reused here).

    python benchmarks/memory.py [--worlds 1 2 4] [--frames-per-rank 16] [--latent 24]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import (BENCH_UNET, ENGINE_DEFAULT, RESULTS, UNET3D_ENGINE, machine, mib, run_ranks, setup_logging,
                     write_result)

logger = logging.getLogger("memory")
MEASURES = (*UNET3D_ENGINE, "benchmarks/attention_memory.py")
"""The engine in the ranks, and attention_memory.py's result, which this one includes."""

FLAT_TARGET = 1.15
"""Per-rank peak at the largest world / at world 1, at equal frames per rank."""
LINEAR_TARGET = 1.3
"""attention_memory.py's criterion: peak(512) <= 1.3 x 8 x peak(64)."""


def _peak_rank(rank: int, world: int, frames_per_rank: int, latent: int, batch: int, settings: dict[str, Any]) -> dict[str, Any]:
    import copy

    import torch

    from _common import PeakMemory, bench_inputs, build_unet
    from video_infinity import parallelize
    from video_infinity.context import ClipContext

    unet = build_unet(BENCH_UNET, latent)
    warm = copy.deepcopy(unet)
    parallelize(warm, settings, ClipContext())
    ctx = ClipContext.from_process_group(frames_per_rank * world)
    parallelize(unet, settings, ctx)
    sample, text = bench_inputs(rank, frames_per_rank, latent, batch)
    with torch.no_grad():
        # Kernels warmed up on a tiny input, so that no full-size freed buffer hides the peak.
        warm(sample[:, :, :2, :8, :8].contiguous(), 500, encoder_hidden_states=text)
        if world > 1:
            torch.distributed.barrier()
        with PeakMemory("cpu") as peak:
            unet(sample, 500, encoder_hidden_states=text)
    return {"rank": rank, "peak_bytes": peak.delta, "input_bytes": sample.numel() * sample.element_size()}


def _plot(rows: list[dict[str, Any]], attention: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if attention else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    axes = list(axes) if panels > 1 else [axes]
    ax = axes[0]
    totals = [r["total_frames"] for r in rows]
    ax.plot(totals, [mib(r["per_rank_peak_max"]) for r in rows], "o-", label="per rank, clips of fixed length")
    ax.plot(totals, [mib(r["one_process_peak"]) for r in rows], "s--", label="one process holding the whole video")
    for r in rows:
        ax.annotate(f"{r['world']} rank{'s' if r['world'] > 1 else ''}", (r["total_frames"], mib(r["per_rank_peak_max"])),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("frames in the video")
    ax.set_ylabel("peak working memory (MiB)")
    ax.set_title("UNet call, engine defaults")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if attention:
        ax = axes[1]
        frames = [r["frames"] for r in attention["rows"]]
        peaks = [mib(r["peak_bytes"]) for r in attention["rows"]]
        ax.plot(frames, peaks, "o-", label="measured")
        ax.plot(frames, [peaks[0] * f / frames[0] for f in frames], ":", label="linear from the first point")
        ax.set_xlabel("frames (one process)")
        ax.set_ylabel("peak working memory (MiB)")
        ax.set_title("dual-scope temporal attention")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames-per-rank", type=int, default=16)
    parser.add_argument("--latent", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--skip-attention", action="store_true", help="do not run attention_memory.py")
    parser.add_argument("--fused", action="store_true",
                        help="engine with split_invariant false (the GPU default) instead of the CPU default")
    args = parser.parse_args()
    setup_logging()
    info = machine()
    logger.info("machine: %s, %d CPU cores, load average %s; UNet %s, %dx%d latents, batch %d, %d frames per rank",
                info["cpu"], info["host_cpus"], info["load_average_at_start"], BENCH_UNET["block_out_channels"],
                args.latent, args.latent, args.batch, args.frames_per_rank)
    settings = {**ENGINE_DEFAULT, "split_invariant": False} if args.fused else ENGINE_DEFAULT
    rows = []
    for world in args.worlds:
        total = world * args.frames_per_rank
        ranks = run_ranks(_peak_rank, world, args.frames_per_rank, args.latent, args.batch, settings)
        whole = ranks if world == 1 else run_ranks(_peak_rank, 1, total, args.latent, args.batch, settings)
        rows.append({"world": world, "total_frames": total, "frames_per_rank": args.frames_per_rank,
                     "per_rank_peak": [r["peak_bytes"] for r in ranks],
                     "per_rank_peak_max": max(r["peak_bytes"] for r in ranks),
                     "one_process_peak": whole[0]["peak_bytes"]})
        logger.info("  world %d done", world)
    first = rows[0]
    for row in rows:
        row["per_rank_ratio_to_first"] = row["per_rank_peak_max"] / first["per_rank_peak_max"]
        row["one_process_ratio_to_first"] = row["one_process_peak"] / first["one_process_peak"]
    logger.info("")
    logger.info("%5s %12s %22s %14s %24s", "world", "total frames", "per-rank peak MiB (max)", "vs world 1",
                "one process, whole video")
    for row in rows:
        logger.info("%5d %12d %22.1f %14.2f %17.1f (x%.2f)", row["world"], row["total_frames"], mib(row["per_rank_peak_max"]),
                    row["per_rank_ratio_to_first"], mib(row["one_process_peak"]), row["one_process_ratio_to_first"])
    flat = rows[-1]["per_rank_ratio_to_first"] <= FLAT_TARGET
    logger.info("per-rank peak at %d frames / at %d frames: %.2f -> %s (target <= %.2f)", rows[-1]["total_frames"],
                first["total_frames"], rows[-1]["per_rank_ratio_to_first"], "flat" if flat else "NOT flat", FLAT_TARGET)

    attention = None
    if not args.skip_attention:
        logger.info("")
        logger.info("single-process temporal attention (benchmarks/attention_memory.py, defaults):")
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("attention_memory.py"))],
                              check=True, capture_output=True, text=True)
        for line in done.stderr.strip().splitlines():
            logger.info("  %s", line)
        attention = json.loads((RESULTS / "attention_memory.json").read_text())
    name = "memory_fused" if args.fused else "memory"
    plot = RESULTS / f"{name}.png"
    RESULTS.mkdir(exist_ok=True)
    _plot(rows, attention, plot)
    logger.info("plot: %s", plot.relative_to(RESULTS.parent.parent))
    write_result(name, {
        "machine": info, "device": "cpu", "unet": BENCH_UNET, "latent": args.latent, "batch": args.batch,
        "settings": "engine defaults (padding 8, top_k 16, phase biases)" + (", fused kernels" if args.fused else ""),
        "rows": rows,
        "per_rank_flat_target": FLAT_TARGET, "per_rank_flat": flat,
        "attention": attention, "attention_linear": attention["linear_within_1_3"] if attention else None,
        "plot": plot.name,
    }, MEASURES)


if __name__ == "__main__":
    main()
