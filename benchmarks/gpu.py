"""VideoCrafter2-size run on one CUDA GPU: seconds per denoising step, peak memory, engine overhead,
the largest clip one GPU holds, and an extrapolation to 8 GPUs x 288 frames (2,304 frames; the paper
made 2,300).

Needs a CUDA GPU: without one it prints one line and exits with status 2.

The UNet is VideoCrafter2's configuration (``FpsUNet3DConditionModel``: block_out_channels (320,
640, 1280, 1280), layers_per_block 2, cross_attention_dim 1024, attention_head_dim 64,
norm_num_groups 32, 4 in/out channels, fps conditioning) with random weights, float16, 320x512
frames (40x64 latents), CFG batch 2, fps 24, random text embeddings (77 x 1024). Measured:
  1. seconds per step (one UNet call) and peak memory at 24 frames (the published frames per GPU)
     for plain diffusers, the engine with a window covering the clip (the overhead target: time
     <= 1.05x, memory <= 1.10x diffusers) and the engine with the published settings, interleaved
     rounds, medians, per-round ratios;
  2. the largest clip the engine (published settings) holds on this GPU in one UNet call: frame
     counts doubled from 24 until out of memory, then bisected (stops early after
     ``--search-seconds``, reporting what it proved);
  3. one step at the frames per rank of the target (2,304 / 8 = 288 frames) on this GPU.
Extrapolation to ``--target-gpus`` x ``--target-frames`` (printed with its assumptions): every rank
computes its clip as measured in 3 (the engine's compute per rank does not depend on the world
size); communication per step is communication.py's formula for bytes sent per rank (float16) over
an assumed ``--link-gbytes`` GB/s per GPU, counted as NOT overlapped with compute (an upper bound);
times ``--steps`` steps; VAE decoding, text encoding and model loading excluded. A second figure
rescales the compute by the ratio of peak dense fp16 tensor throughput between this card and an RTX
6000 Ada (the paper's card) -- a rough guide only.

    python benchmarks/gpu.py [--frames-per-rank 24] [--repeats 5] [--search-seconds 240]
    python benchmarks/gpu.py --smoke   # the script's own check, on CPU with a small UNet
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from typing import Any

from _common import (BENCH_UNET, ENGINE_DEFAULT, ENGINE_WHOLE_WINDOW, TEXT_TOKENS, UNET3D_ENGINE, VIDEOCRAFTER2_UNET,
                     PeakMemory, build_unet, largest_fitting, machine, mib, paired_ratio, setup_logging, write_result)
from _gpu import add_commit_argument, copy_labels

logger = logging.getLogger("gpu")
MEASURES = UNET3D_ENGINE

VARIANTS = {"diffusers": None, "engine_whole_window": ENGINE_WHOLE_WINDOW, "engine_default": ENGINE_DEFAULT}
TIMESTEP = 500
FPS = 24
PEAK_FP16_TFLOPS = {  # dense fp16 tensor-core peak (vendor spec sheets); used only for the rough rescaling
    "H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "RTX 6000 Ada": 364, "L40": 181,
    "A6000": 155, "A5000": 111, "4090": 330,
}
PAPER = {"gpus": 8, "card": "RTX 6000 Ada", "frames": 2300, "seconds": 312}


def _peak_tflops(name: str) -> float | None:
    for key, value in PEAK_FP16_TFLOPS.items():  # more specific keys first in the dict
        if key in name:
            return float(value)
    return None


class Runner:
    """One UNet on the device; the engine attached per call, so the variants share weights."""

    def __init__(self, smoke: bool) -> None:
        import torch

        self.torch = torch
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.float16
        config = BENCH_UNET if smoke else VIDEOCRAFTER2_UNET
        self.latent = (8, 8) if smoke else (40, 64)
        self.unet = build_unet(config, self.latent[0], fps=True, device=self.device, dtype=self.dtype)
        self.text = torch.randn(2, TEXT_TOKENS, config["cross_attention_dim"], device=self.device, dtype=self.dtype)
        self.params = sum(p.numel() for p in self.unet.parameters())

    def sample(self, frames: int) -> Any:
        return self.torch.randn(2, 4, frames, *self.latent, device=self.device, dtype=self.dtype)

    def timed(self, variant: str, sample: Any) -> float:
        # parallelize()/remove() only register hooks; the sync points bracket the UNet call itself.
        from video_infinity import parallelize
        from video_infinity.context import ClipContext

        settings = VARIANTS[variant]
        handle = None if settings is None else parallelize(self.unet, settings, ClipContext())
        try:
            with self.torch.no_grad():
                self.sync()
                start = time.perf_counter()
                self.unet(sample, TIMESTEP, encoder_hidden_states=self.text, fps=FPS)
                self.sync()
                return time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def peak(self, variant: str, frames: int) -> int:
        sample = self.sample(frames)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        with PeakMemory(self.device) as peak:
            self.timed(variant, sample)
        return peak.delta

    def fits(self, frames: int) -> tuple[bool, float | str]:
        """Whether one engine-default call on ``frames`` frames runs: (True, seconds) or (False, why).

        Out of memory is the expected failure; a kernel refusing a tensor that large (32-bit
        indexing limits) also ends the search, with its message recorded.
        """
        try:
            return True, self.timed("engine_default", self.sample(frames))
        except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return False, "out of memory" if "out of memory" in first.lower() else first[:200]
        finally:
            if self.device == "cuda":
                self.torch.cuda.empty_cache()


def largest_clip(runner: Runner, start: int, max_frames: int, budget_s: float) -> dict[str, Any]:
    # Bisection stops within 1/32 of the largest fitting clip: at ~1,000 frames each try is costly.
    return largest_fitting(runner.fits, start, max_frames, budget_s, resolution=lambda ok: max(1, ok // 32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-rank", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=1024, help="upper end of the largest-clip search")
    parser.add_argument("--search-seconds", type=float, default=240, help="time budget of the largest-clip search")
    parser.add_argument("--target-gpus", type=int, default=8)
    parser.add_argument("--target-frames", type=int, default=2304)
    parser.add_argument("--steps", type=int, default=30, help="denoising steps of the extrapolated run")
    parser.add_argument("--link-gbytes", type=float, default=16.0,
                        help="assumed GB/s each GPU sends to its peers (PCIe 4.0 x16 peer-to-peer without NVLink: "
                             "about 12-25)")
    parser.add_argument("--smoke", action="store_true", help="check the script on CPU with a small UNet (not a benchmark)")
    add_commit_argument(parser)
    args = parser.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        return 2
    setup_logging()
    if args.smoke:
        args.frames_per_rank, args.repeats, args.warmup, args.max_frames = 4, 1, 1, 16
        torch.set_num_threads(1)
    info = machine()
    runner = Runner(args.smoke)
    card = info.get("gpu", "CPU (smoke test)")
    logger.info("device: %s; UNet: VideoCrafter2 config%s, %.0f M parameters, %s, latents %dx%d, CFG batch 2, fps %d",
                card, " (SMOKE: small UNet on CPU)" if args.smoke else "", runner.params / 1e6,
                str(runner.dtype).removeprefix("torch."), *runner.latent, FPS)

    # 1. seconds per step, overhead, peak memory at the published frames per GPU
    frames = args.frames_per_rank
    sample = runner.sample(frames)
    for _ in range(args.warmup):
        for name in VARIANTS:
            runner.timed(name, sample)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[: r % 3]:
            times[name].append(runner.timed(name, sample))
    del sample
    rows = []
    peaks = {name: runner.peak(name, frames) for name in VARIANTS}
    for name in VARIANTS:
        rows.append({"variant": name, "frames": frames, "seconds_median": statistics.median(times[name]),
                     "seconds": times[name], "time_ratio": paired_ratio(times[name], times["diffusers"]),
                     "peak_bytes": peaks[name], "memory_ratio": peaks[name] / peaks["diffusers"]})
    logger.info("")
    logger.info("%-20s %6s %12s %11s %12s %10s", "variant", "frames", "s per step", "time ratio", "peak GiB", "mem ratio")
    for row in rows:
        logger.info("%-20s %6d %12.3f %11.3f %12.2f %10.3f", row["variant"], row["frames"], row["seconds_median"],
                    row["time_ratio"], row["peak_bytes"] / 2**30, row["memory_ratio"])

    # 2. the largest clip
    logger.info("")
    logger.info("largest clip (engine, published settings, one UNet call with CFG batch 2):")
    largest = largest_clip(runner, frames, args.max_frames, args.search_seconds)
    logger.info("largest clip that fits: %d frames%s", largest["largest_fitting"],
                "" if largest["search_complete"] else f" (search stopped after {largest['search_seconds']:.0f} s: a lower bound)")

    # 3. the target's frames per rank, and the extrapolation
    per_rank = math.ceil(args.target_frames / args.target_gpus)
    fits, why = runner.fits(per_rank)  # also the warm-up: the first call at a new size may autotune
    step_s = statistics.median([runner.timed("engine_default", runner.sample(per_rank)) for _ in range(2)]) if fits else None
    import communication

    total_frames = args.target_gpus * per_rank
    elem = 4 if args.smoke else 2
    unet_config = BENCH_UNET if args.smoke else VIDEOCRAFTER2_UNET
    sent = [sum(communication.engine_bytes(unet_config, *runner.latent, 2, elem, total_frames, args.target_gpus, r).values())
            for r in range(args.target_gpus)]
    comm_s = max(sent) / (args.link_gbytes * 1e9)
    extrapolation: dict[str, Any] = {
        "gpus": args.target_gpus, "frames": args.target_frames, "frames_per_rank": per_rank, "steps": args.steps,
        "assumptions": [
            "each rank computes its clip as fast as one GPU does alone (measured: one UNet call at frames_per_rank)",
            f"communication: bytes sent by the busiest rank per step (communication.py formula, float16) over "
            f"{args.link_gbytes} GB/s, not overlapped with compute",
            "excluded: model loading, text encoding, VAE decoding, gathering frames to rank 0, MP4 writing",
            "card rescaling by peak dense fp16 tensor TFLOPS only (memory bandwidth and kernels differ)",
        ],
        "step_seconds_per_rank": step_s, "comm_bytes_per_step_busiest_rank": max(sent),
        "comm_seconds_per_step": comm_s,
    }
    logger.info("")
    if step_s is None:
        logger.info("%d frames per rank do not run on this GPU in one UNet call (%s): no extrapolation", per_rank, why)
    else:
        total_s = args.steps * (step_s + comm_s)
        extrapolation["denoise_seconds_this_card"] = total_s
        mine, theirs = _peak_tflops(card), _peak_tflops(PAPER["card"])
        scaled = args.steps * (step_s * mine / theirs + comm_s) if mine and theirs else None
        extrapolation["denoise_seconds_scaled_to_rtx6000ada"] = scaled
        extrapolation["peak_fp16_tflops"] = {"this_card": mine, PAPER["card"]: theirs}
        logger.info("extrapolation: %d x %s, %d frames (%d per rank), %d steps:", args.target_gpus, card,
                    args.target_frames, per_rank, args.steps)
        logger.info("  compute %.2f s/step per rank (measured) + communication %.1f MiB/step from the busiest rank "
                    "at %.0f GB/s = %.3f s/step (not overlapped)", step_s, mib(max(sent)), args.link_gbytes, comm_s)
        logger.info("  -> about %.0f s of denoising (%.1f frames/s)", total_s, args.target_frames / total_s)
        if scaled:
            logger.info("  rescaled to %d x %s by peak fp16 TFLOPS (%.0f vs %.0f): about %.0f s (paper: ~%d s for "
                        "the whole run)", args.target_gpus, PAPER["card"], mine, theirs, scaled, PAPER["seconds"])
    if args.smoke:
        logger.info("smoke test: nothing written")
        return 0
    write_result("gpu", {
        "machine": info, "card": card, "smoke": args.smoke, "unet": unet_config, "fps_cond": True,
        "dtype": str(runner.dtype), "latent": runner.latent, "batch": 2, "parameters": runner.params,
        "rows": rows, "largest_clip": largest, "extrapolation": extrapolation, "paper": PAPER,
    }, MEASURES, copy_labels(args.commit, card, "gpu.py"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
