"""Wan2.1-1.3B-size transformer on one CUDA GPU: plain diffusers against the engine, time and memory.

Needs a CUDA GPU: without one it prints one line and exits with status 2, unless ``--cpu`` (a small
transformer on the CPU, to check the script and give CPU ratios at a small size).

GPU run: diffusers' ``WanTransformer3DModel`` in Wan2.1-T2V-1.3B's configuration (30 layers, 12 heads
of 128, ffn 8960, text_dim 4096, patch (1, 2, 2)) with random weights, bfloat16, 480x832 frames
(60x104 latents: 1,560 tokens per latent frame), 81 frames = 21 latent frames, batch 1 (one CFG
branch), random text embeddings (512 x 4096), timestep 500. Measured side by side, interleaved
rounds, medians and per-round ratios:
  1. seconds per transformer call and peak memory above the weights for plain diffusers, the engine
     with a window covering the whole video (target: <= 1.05x time, <= 1.10x memory) and the engine
     with the ``wan`` preset (padding 8, top_k 4), its band attention as the GPU default runs it
     (``attn.kernel: auto``: one FlexAttention call per chunk of query frames) and with
     ``attn.kernel: sdpa`` (one fused call per query frame; on GPU only);
  2. the largest number of latent frames one call holds with the ``wan`` preset (doubling, then
     bisecting; stops after ``--search-seconds``);
  3. one call at ceil(257 / 8) = 33 latent frames (1,025 frames on 8 GPUs).
Extrapolation to 1,025 frames on 8 GPUs, LABELLED AS ONE: every rank computes its 33 latent frames as
measured in 3; per call each rank sends keys/values of ``padding`` frames to each neighbour and its
global frames, per layer (bfloat16), over an assumed ``--link-gbytes`` GB/s, counted as not
overlapped (an upper bound); x 2 calls per step (CFG) x ``--steps`` steps; VAE decode, text encoding
and loading excluded.

    python benchmarks/gpu_wan.py [--repeats 5] [--search-seconds 240]
    python benchmarks/gpu_wan.py --cpu   # small transformer on CPU; writes results/gpu_wan_cpu.json
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import statistics
import sys
import time
from typing import Any

from _common import WAN_ENGINE, PeakMemory, largest_fitting, machine, mib, paired_ratio, setup_logging, write_result
from _gpu import add_commit_argument, cast_as_loaded, copy_labels

logger = logging.getLogger("gpu_wan")
MEASURES = WAN_ENGINE

WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                  text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
"""Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer/config.json."""

CPU_SMALL = dict(WAN21_1_3B, num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=2)
"""A small transformer with Wan's layout, for the CPU run."""

WHOLE_WINDOW = {"attn": {"padding": 1024, "top_k": 0, "local_phase": None, "global_phase": None}}


def variants(cpu: bool) -> dict[str, Any]:
    from video_infinity.presets import PRESETS

    found: dict[str, Any] = {"diffusers": None, "engine_whole_window": WHOLE_WINDOW, "engine_wan_preset": PRESETS["wan"]}
    if not cpu:  # the default (auto) is one FlexAttention call per chunk of query frames: the per-frame calls too
        found["engine_wan_preset_sdpa"] = {**PRESETS["wan"], "attn": {**PRESETS["wan"]["attn"], "kernel": "sdpa"}}
    if cpu:  # on CPU the engine's default is the split-invariant computation; show the fused one too
        found["engine_whole_window_fused"] = {**WHOLE_WINDOW, "split_invariant": False}
        found["engine_wan_preset_fused"] = {**PRESETS["wan"], "split_invariant": False}
    return found


class Runner:
    """One transformer on the device; the engine attached per call, so the variants share weights."""

    def __init__(self, cpu: bool, height: int, width: int, text_tokens: int) -> None:
        import torch
        from diffusers import WanTransformer3DModel

        self.torch = torch
        self.device = "cpu" if cpu else "cuda"
        self.dtype = torch.float32 if cpu else torch.bfloat16
        self.config = CPU_SMALL if cpu else WAN21_1_3B
        self.latent = (height // 8, width // 8)
        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = WanTransformer3DModel(**self.config).eval().requires_grad_(False)
        if self.dtype != torch.float32:
            # As from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in float32 stay so.
            cast_as_loaded(self.model, self.dtype)
        self.text = torch.randn(1, text_tokens, self.config["text_dim"], device=self.device, dtype=self.dtype)
        self.timestep = torch.tensor([500.0], device=self.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.variants = variants(cpu)

    def sample(self, latent_frames: int) -> Any:
        return self.torch.randn(1, self.config["in_channels"], latent_frames, *self.latent, device=self.device,
                                dtype=self.dtype)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def timed(self, variant: str, sample: Any) -> float:
        from video_infinity import parallelize
        from video_infinity.context import ClipContext

        settings = self.variants[variant]
        handle = None if settings is None else parallelize(self.model, settings, ClipContext())
        try:
            with self.torch.no_grad():
                self.sync()
                start = time.perf_counter()
                self.model(sample, self.timestep, self.text)
                self.sync()
                return time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()

    def peak(self, variant: str, latent_frames: int) -> int:
        sample = self.sample(latent_frames)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        with PeakMemory(self.device) as peak:
            self.timed(variant, sample)
        return peak.delta

    def fits(self, latent_frames: int) -> tuple[bool, float | str]:
        try:
            return True, self.timed("engine_wan_preset", self.sample(latent_frames))
        except (MemoryError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return False, "out of memory" if "out of memory" in first.lower() else first[:200]
        finally:
            if self.device == "cuda":
                self.torch.cuda.empty_cache()


def _cpu_peak(args: tuple[str, int, int, int, int]) -> int:
    """One variant's peak RSS in a fresh process (CPU figures need an allocator without history)."""
    variant, latent_frames, height, width, text_tokens = args
    import torch

    torch.set_num_threads(1)
    runner = Runner(True, height, width, text_tokens)
    # No warm-up call: memory it freed would stay with the allocator and hide this call's peak.
    return runner.peak(variant, latent_frames)


def largest_clip(runner: Runner, start: int, max_frames: int, budget_s: float) -> dict[str, Any]:
    result = largest_fitting(runner.fits, start, max_frames, budget_s, unit="latent frames")
    result["largest_fitting_latent_frames"] = result.pop("largest_fitting")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small transformer on the CPU (not the GPU benchmark)")
    parser.add_argument("--frames", type=int, default=81, help="video frames of part 1 (4k+1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--search-seconds", type=float, default=240)
    parser.add_argument("--max-latent-frames", type=int, default=1024)
    parser.add_argument("--target-gpus", type=int, default=8)
    parser.add_argument("--target-frames", type=int, default=1025)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the extrapolated run (Wan's default)")
    parser.add_argument("--link-gbytes", type=float, default=16.0, help="assumed GB/s each GPU sends to its peers")
    add_commit_argument(parser)
    args = parser.parse_args()
    import torch

    from video_infinity.families.wan.vae import latent_frame_count
    from video_infinity.presets import PRESETS

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_wan.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured; --cpu runs "
              "a small size on the CPU", file=sys.stderr)
        return 2
    setup_logging()
    height, width, text_tokens = (256, 256, 32) if args.cpu else (480, 832, 512)
    if args.cpu:
        args.frames, args.repeats, args.warmup = 81, 5, 1
        torch.set_num_threads(1)
    info = machine()
    runner = Runner(args.cpu, height, width, text_tokens)
    latent_frames = latent_frame_count(args.frames)
    tokens_per_frame = runner.latent[0] // 2 * runner.latent[1] // 2
    logger.info("device: %s; transformer: %s, %.0f M parameters, %s, %dx%d (%d tokens per latent frame), "
                "%d frames = %d latent frames", info.get("gpu", "CPU"), "small Wan layout" if args.cpu else "Wan2.1-1.3B",
                runner.params / 1e6, str(runner.dtype).removeprefix("torch."), height, width, tokens_per_frame,
                args.frames, latent_frames)

    sample = runner.sample(latent_frames)
    names = list(runner.variants)
    for _ in range(args.warmup):
        for name in names:
            runner.timed(name, sample)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(runner.timed(name, sample))
    del sample
    if args.cpu:
        context = multiprocessing.get_context("spawn")
        with context.Pool(1, maxtasksperchild=1) as pool:
            peaks = dict(zip(names, pool.map(_cpu_peak, [(n, latent_frames, height, width, text_tokens) for n in names],
                                             chunksize=1)))
    else:
        peaks = {name: runner.peak(name, latent_frames) for name in names}
    rows = []
    for name in names:
        rows.append({"variant": name, "seconds_median": statistics.median(times[name]), "seconds": times[name],
                     "peak_bytes": peaks[name],
                     "time_ratio_vs_diffusers": None if name == "diffusers" else paired_ratio(times[name], times["diffusers"]),
                     "memory_ratio_vs_diffusers": None if name == "diffusers" else peaks[name] / peaks["diffusers"]})
        logger.info("%-26s %8.3f s  peak %8.1f MiB%s", name, rows[-1]["seconds_median"], mib(peaks[name]),
                    "" if name == "diffusers" else f"  time x{rows[-1]['time_ratio_vs_diffusers']:.3f}, "
                    f"memory x{rows[-1]['memory_ratio_vs_diffusers']:.3f}")
    result: dict[str, Any] = {
        "machine": info, "model": "small Wan layout (CPU)" if args.cpu else "Wan2.1-T2V-1.3B configuration, random weights",
        "config": runner.config, "dtype": str(runner.dtype), "height": height, "width": width,
        "tokens_per_latent_frame": tokens_per_frame, "frames": args.frames, "latent_frames": latent_frames,
        "text_tokens": text_tokens, "wan_preset": PRESETS["wan"], "repeats": args.repeats, "variants": rows,
        "targets": {"time_ratio_whole_window": 1.05, "memory_ratio_whole_window": 1.10},
    }
    if not args.cpu:
        logger.info("largest latent-frame count in one call (wan preset):")
        result["largest_clip"] = largest_clip(runner, latent_frames, args.max_latent_frames, args.search_seconds)
        per_rank = math.ceil(latent_frame_count(args.target_frames) / args.target_gpus)
        call = statistics.median(runner.timed("engine_wan_preset", runner.sample(per_rank)) for _ in range(3))
        cfg = runner.config
        preset = PRESETS["wan"]["attn"]
        kv_frame_bytes = 2 * tokens_per_frame * cfg["num_attention_heads"] * cfg["attention_head_dim"] * 2  # K+V, bf16
        sent = (2 * preset["padding"] + preset["top_k"]) * kv_frame_bytes * cfg["num_layers"]  # upper bound per call
        communication = sent / (args.link_gbytes * 1e9)
        total = 2 * args.steps * (call + communication)
        result["extrapolation"] = {
            "label": "EXTRAPOLATION, not a measurement", "target_frames": args.target_frames, "gpus": args.target_gpus,
            "latent_frames_per_rank": per_rank, "measured_call_seconds": call,
            "assumed_link_gbytes_per_s": args.link_gbytes, "bytes_sent_per_rank_per_call_upper_bound": sent,
            "communication_seconds_per_call_not_overlapped": communication, "steps": args.steps, "calls_per_step": 2,
            "denoising_seconds": total, "excluded": "VAE decode, text encoding, loading",
        }
        logger.info("EXTRAPOLATION: %d frames on %d GPUs, %d steps: %.0f s of denoising (measured %.2f s per call at "
                    "%d latent frames + %.3f s assumed communication per call)", args.target_frames, args.target_gpus,
                    args.steps, total, call, per_rank, communication)
    labels = None if args.cpu else copy_labels(args.commit, info.get("gpu"), "gpu_wan.py")
    write_result("gpu_wan_cpu" if args.cpu else "gpu_wan", result, MEASURES, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
