"""Peak memory of single-process dual-scope temporal attention as the video grows.

Claim checked: memory is linear in frames (O(frames x window)), i.e. the peak at 512 frames is within
1.3x of 8 x the peak at 64 frames. Each size runs in a fresh subprocess; on CPU the peak is the
process's high-water RSS (reset with /proc/self/clear_refs after the inputs exist), on GPU
torch.cuda.max_memory_allocated. Inputs are excluded; the processor's own working memory is what is
measured (projections, halo/global buffers, scores, output).

    python benchmarks/attention_memory.py [--frames 64 128 256 512] [--spatial 256] [--channels 64]

Writes benchmarks/results/attention_memory.json; ``memory.py`` runs this script with its defaults and
includes that JSON (and a plot of it) in its own result.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from _common import ENGINE_CORE, machine, setup_logging, write_result

logger = logging.getLogger("attention_memory")
KERNELS = ("split_invariant", "fused")
MEASURES = ENGINE_CORE
"""The dual-scope processor and what it reads (config, context); measured in child processes."""


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(frames: int, spatial: int, channels: int, padding: int, top_k: int, device: str, kernel: str) -> dict:
    """Working memory (bytes) of one DualScopeAttnProcessor call on ``frames`` frames."""
    import torch
    from diffusers.models.attention_processor import Attention

    from video_infinity.engine.attention import DualScopeAttnProcessor
    from video_infinity.config import AttentionConfig, EngineConfig
    from video_infinity.context import ClipContext, DenoiseState

    torch.manual_seed(0)
    attn = Attention(channels, heads=channels // 16, dim_head=16).to(device).eval()
    ctx = ClipContext()
    state = DenoiseState(layout=ctx.layout_for(frames), timestep=900.0)
    config = EngineConfig(attn=AttentionConfig(padding=padding, top_k=top_k, token_num_scale=True),
                          split_invariant=kernel == "split_invariant")
    processor = DualScopeAttnProcessor(config, ctx, state)
    x = torch.randn(spatial, frames, channels, device=device)
    with torch.no_grad():
        # Warm up kernels on a tiny input of its own (a full-size warm-up would leave freed memory in
        # the allocator and hide the real peak).
        tiny_state = DenoiseState(layout=ctx.layout_for(4), timestep=900.0)
        DualScopeAttnProcessor(config, ctx, tiny_state)(attn, x[:2, :4].contiguous())
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
            base = _rss_kib("VmRSS") * 1024
        out = processor(attn, x)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
    assert out.shape == x.shape
    return {"frames": frames, "kernel": kernel, "peak_bytes": peak - base, "input_bytes": x.numel() * x.element_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--spatial", type=int, default=256, help="batch x height x width positions")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--padding", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS,
                        help="attention computations to measure (split_invariant: the CPU default; fused: the GPU default)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.spatial, args.channels, args.padding, args.top_k, args.device,
                                 args.kernels[0])))
        return
    setup_logging()
    info = machine()
    kernels = {}
    for kernel in args.kernels:
        rows = []
        for frames in args.frames:
            cmd = [sys.executable, __file__, "--child", str(frames), "--spatial", str(args.spatial), "--channels",
                   str(args.channels), "--padding", str(args.padding), "--top-k", str(args.top_k), "--device",
                   args.device, "--kernels", kernel]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        first = rows[0]
        logger.info("%s attention:", kernel)
        logger.info("%8s %14s %14s %22s", "frames", "peak MiB", "input MiB", f"peak / ({first['frames']}-frame peak)")
        for row in rows:
            row["ratio_to_first"] = row["peak_bytes"] / first["peak_bytes"]
            row["linear_ratio"] = row["ratio_to_first"] / (row["frames"] / first["frames"])
            logger.info("%8d %14.1f %14.1f %12.2f (linear: %.2f)", row["frames"], row["peak_bytes"] / 2**20,
                        row["input_bytes"] / 2**20, row["ratio_to_first"], row["frames"] / first["frames"])
        last = rows[-1]
        verdict = last["linear_ratio"] <= 1.3
        logger.info("peak(%d) / (%d x peak(%d)) = %.2f -> %s (target <= 1.3)", last["frames"],
                    last["frames"] // first["frames"], first["frames"], last["linear_ratio"],
                    "linear" if verdict else "NOT linear")
        kernels[kernel] = {"rows": rows, "linear_within_1_3": verdict}
    main_kernel = kernels[args.kernels[0]]
    write_result("attention_memory", {
        "machine": info, "device": args.device, "spatial": args.spatial, "channels": args.channels,
        "padding": args.padding, "top_k": args.top_k, "kernel": args.kernels[0], "rows": main_kernel["rows"],
        "linear_within_1_3": all(k["linear_within_1_3"] for k in kernels.values()), "kernels": kernels,
    }, MEASURES)


if __name__ == "__main__":
    main()
