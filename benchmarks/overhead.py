"""Engine overhead on one process: the parallelized UNet vs the unmodified diffusers UNet, same clip.

Variants, all on the same weights and inputs (one UNet call = one denoising step, CFG batch 2):
  * ``diffusers``: the unmodified UNet3DConditionModel;
  * ``engine_whole_window_fused``: ``parallelize`` with a window covering the clip (padding 64, top_k 0,
    no phase biases) and fused kernels (``split_invariant: false``, the GPU default), i.e. the same
    computation as diffusers: this is where the targets apply (time ratio <= 1.05, peak-memory
    ratio <= 1.10);
  * ``engine_whole_window``: the same with the CPU default, ``split_invariant``: every frame computed
    the same way whatever its rank holds (bit-identical videos on any number of ranks), at a cost
    this benchmark reports;
  * ``engine_default``: the published dual-scope settings (padding 8, top_k 16, phase biases), which
    compute more (global keys, masked windows); shown for information.

Timing: the variants run interleaved in one process (the order rotates every round), after warm-up;
the ratio is the median over rounds of the per-round ratio, so slow phases of a shared machine hit
both sides. Memory: each (variant, frames) runs in fresh subprocesses (median of 3); the peak is the RSS
high-water mark above the RSS before the call (CPU) or ``max_memory_allocated`` above the allocated
memory before the call (CUDA).

    python benchmarks/overhead.py [--frames 16 24] [--latent 24] [--repeats 9] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
from typing import Any

from _common import (BENCH_UNET, ENGINE_DEFAULT, ENGINE_WHOLE_WINDOW, ENGINE_WHOLE_WINDOW_FUSED, UNET3D_ENGINE, PeakMemory,
                     bench_inputs, build_unet, interleaved, machine, mib, paired_ratio, setup_logging, write_result)

logger = logging.getLogger("overhead")
MEASURES = UNET3D_ENGINE

VARIANTS = {"diffusers": None, "engine_whole_window": ENGINE_WHOLE_WINDOW,
            "engine_whole_window_fused": ENGINE_WHOLE_WINDOW_FUSED, "engine_default": ENGINE_DEFAULT}
TARGET_VARIANT = "engine_whole_window_fused"
"""The targets are for the fused kernels (the engine's speed)."""
EXACT_VARIANT = "engine_whole_window"
"""The split-invariant computation (the CPU default) buys bit-identical videos on any number of
ranks at the ratio reported beside the target's."""
TIME_TARGET = 1.05
MEMORY_TARGET = 1.10
TIMESTEP = 500


def _attach(unet: Any, variant: str) -> Any:
    from video_infinity import parallelize
    from video_infinity.context import ClipContext

    settings = VARIANTS[variant]
    return None if settings is None else parallelize(unet, settings, ClipContext())


def memory_child(variant: str, frames: int, latent: int, batch: int, device: str) -> dict[str, Any]:
    """Peak working memory of one UNet call (fresh process)."""
    import torch

    unet = build_unet(BENCH_UNET, latent, device=device)
    _attach(unet, variant)
    sample, text = bench_inputs(1, frames, latent, batch, device)
    tiny_sample, tiny_text = bench_inputs(1, 2, 8, batch, device)
    with torch.no_grad():
        unet(tiny_sample, TIMESTEP, encoder_hidden_states=tiny_text)  # load kernels, not full-size buffers
        with PeakMemory(device) as peak:
            out = unet(sample, TIMESTEP, encoder_hidden_states=text).sample
    assert out.shape == sample.shape
    return {"variant": variant, "frames": frames, "peak_bytes": peak.delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 24])
    parser.add_argument("--latent", type=int, default=24, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: CFG's conditional + unconditional)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh subprocesses per (variant, frames); median")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a small shared machine a busy core stalls every "
                             "multi-threaded kernel and makes timings several times slower and far noisier")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(args.child[0], int(args.child[1]), args.latent, args.batch, args.device)))
        return
    setup_logging()
    info = machine()
    logger.info("machine: %s, %d CPUs, torch %s (%d threads), load average %s%s", info["cpu"], info["host_cpus"],
                info["torch"], info["torch_threads"], info["load_average_at_start"],
                f", GPU {info['gpu']}" if info.get("gpu") else "")
    logger.info("UNet %s, latents %dx%d, batch %d, timestep %d", BENCH_UNET["block_out_channels"], args.latent,
                args.latent, args.batch, TIMESTEP)

    base = build_unet(BENCH_UNET, args.latent, device=args.device)
    models = {name: copy.deepcopy(base) for name in VARIANTS}
    for name, unet in models.items():
        _attach(unet, name)

    rows = []
    for frames in args.frames:
        sample, text = bench_inputs(1, frames, args.latent, args.batch, args.device)
        outputs: dict[str, Any] = {}

        def call(name: str):
            def run() -> None:
                with torch.no_grad():
                    outputs[name] = models[name](sample, TIMESTEP, encoder_hidden_states=text).sample
            return run

        times = interleaved({name: call(name) for name in VARIANTS}, args.repeats, args.warmup, args.device,
                            on_round=lambda r: logger.info("  %d frames: round %d/%d done", frames, r + 1, args.repeats))
        same = {name: (outputs[name] - outputs["diffusers"]).abs().max().item() for name in (TARGET_VARIANT, EXACT_VARIANT)}
        peaks: dict[str, list[int]] = {name: [] for name in VARIANTS}
        for _ in range(args.memory_repeats):
            for name in VARIANTS:
                cmd = [sys.executable, __file__, "--child", name, str(frames), "--latent", str(args.latent), "--batch",
                       str(args.batch), "--device", args.device, "--threads", str(args.threads)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                peaks[name].append(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])
        memory = {name: statistics.median(values) for name, values in peaks.items()}
        for name in VARIANTS:
            rows.append({
                "frames": frames, "variant": name,
                "seconds_median": statistics.median(times[name]), "seconds": times[name],
                "time_ratio": paired_ratio(times[name], times["diffusers"]),
                "peak_bytes": memory[name], "peak_bytes_all": peaks[name], "memory_ratio": memory[name] / memory["diffusers"],
                "max_abs_diff_vs_diffusers": same.get(name),
            })

    logger.info("")
    logger.info("%6s  %-20s %10s %11s %11s %10s", "frames", "variant", "median s", "time ratio", "peak MiB", "mem ratio")
    for row in rows:
        logger.info("%6d  %-20s %10.3f %11.3f %11.1f %10.3f", row["frames"], row["variant"], row["seconds_median"],
                    row["time_ratio"], mib(row["peak_bytes"]), row["memory_ratio"])
    target_rows = [r for r in rows if r["variant"] == TARGET_VARIANT]
    exact_rows = [r for r in rows if r["variant"] == EXACT_VARIANT]
    time_ok = all(r["time_ratio"] <= TIME_TARGET for r in target_rows)
    memory_ok = all(r["memory_ratio"] <= MEMORY_TARGET for r in target_rows)
    logger.info("engine (window covering the clip, fused kernels) vs diffusers: time ratio %s (target <= %.2f: %s), "
                "memory ratio %s (target <= %.2f: %s); outputs differ by at most %s",
                ", ".join(f"{r['time_ratio']:.3f}" for r in target_rows), TIME_TARGET, "met" if time_ok else "NOT met",
                ", ".join(f"{r['memory_ratio']:.3f}" for r in target_rows), MEMORY_TARGET,
                "met" if memory_ok else "NOT met", ", ".join(f"{r['max_abs_diff_vs_diffusers']:.2e}" for r in target_rows))
    logger.info("split-invariant (bit-identical on any number of ranks; the CPU default): time ratio %s, memory ratio %s",
                ", ".join(f"{r['time_ratio']:.3f}" for r in exact_rows), ", ".join(f"{r['memory_ratio']:.3f}" for r in exact_rows))
    write_result("overhead", {
        "machine": info, "device": args.device, "unet": BENCH_UNET, "latent": args.latent, "batch": args.batch,
        "timestep": TIMESTEP, "repeats": args.repeats, "warmup": args.warmup, "memory_repeats": args.memory_repeats, "variants": VARIANTS,
        "targets": {"time_ratio": TIME_TARGET, "memory_ratio": MEMORY_TARGET},
        "time_target_met": time_ok, "memory_target_met": memory_ok, "rows": rows,
    }, MEASURES)


if __name__ == "__main__":
    main()
