"""Wan's band attention on one GPU: the engine's one call per query frame against one kernel per chunk.

Engine suggestion 6 (benchmarks/README.md): with a band window, ``WanEngineAttnProcessor`` attends one
query latent frame per fused call (``attn.kernel: sdpa``, what ``auto`` picks), and on one H200 the
``wan`` preset took 2.1x diffusers' time at 81 frames (``gpu_wan.json``). This script times one layer's self-attention at Wan2.1-1.3B's shape (12 heads
of 128, 1,560 tokens per latent frame), bf16, ``--frames`` latent frames, the preset's window (padding 8)
and 4 global frames, with the phase biases (10 on one group of keys, 0 on the other), for:

  engine_sdpa  ``engine.attention.dual_scope_attention`` as the processor calls it with ``attn.kernel:
               sdpa`` (``chunk_size`` 1, ``split_invariant`` off): one fused call per query frame over its
               window's keys and the global keys, the biases as a (1, keys) mask;
  engine_flat  the same with equal biases (no mask: the flash kernel), to isolate the mask's cost;
  stacked      query frames whose windows have the full length in groups of ``--group``, each group
               one call over (group, heads, tokens, d) with its frames' keys gathered (the edge frames
               as ``engine_sdpa``), the same mask;
  engine_flex  ``engine.flex.band_attention`` as the processor calls it with ``attn.kernel: flex``: one
               compiled FlexAttention call over the clip's queries, its keys and the global keys, a
               block mask built from the frames, the biases as a score modification.

Each candidate's output is compared with ``engine_sdpa``'s (largest absolute difference over the largest
value), then every variant is timed in interleaved rounds (CUDA synchronised; the median), and its
TFLOP/s computed from the attention FLOPs it needs (4 x queries x keys each x head dim x heads). The
first ``engine_flex`` call's time (compiling the kernel) is recorded apart.
Needs a CUDA GPU; ``--smoke`` checks the script on CPU at a tiny shape (flex unfused, times
meaningless) and writes nothing.

    python benchmarks/band_attention.py [--frames 21 81] [--group 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from typing import Any, Callable

from _common import ENGINE_CORE, interleaved, machine, setup_logging, write_result
from _gpu import copy_labels, parse_gpu_args

logger = logging.getLogger("band_attention")
MEASURES = ENGINE_CORE

HEADS, HEAD_DIM, TOKENS = 12, 128, 1560
"""Wan2.1-T2V-1.3B at 480x832: 12 heads of 128, 60x104 latents in patches of 2x2."""
PADDING, TOP_K = 8, 4
"""The ``wan`` preset's window (latent frames each side) and global frames."""
LOCAL_BIAS, GLOBAL_BIAS = 0.0, 10.0
"""A phase's biases (the preset's global phase: 10 on the global keys)."""


def global_frames(total: int, top_k: int) -> list[int]:
    """``top_k`` frames spread over the clip (the engine's fixed global frames are so spread)."""
    return sorted({round((i + 0.5) * total / top_k - 0.5) for i in range(top_k)})


def build(total: int, device: str, dtype: Any, heads: int, head_dim: int, tokens: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    q, k, v = (randn(1, heads, total * tokens, head_dim) for _ in range(3))
    chosen = global_frames(total, TOP_K)
    rows = torch.cat([torch.arange(f * tokens, (f + 1) * tokens, device=device) for f in chosen])
    return {"q": q, "k": k, "v": v, "globals": chosen, "k_global": k[..., rows, :].contiguous(),
            "v_global": v[..., rows, :].contiguous(), "total": total, "tokens": tokens, "scale": head_dim**-0.5}


def engine(case: dict[str, Any], local_bias: float = LOCAL_BIAS, global_bias: float = GLOBAL_BIAS) -> Any:
    from video_infinity.engine.attention import dual_scope_attention

    total = case["total"]
    return dual_scope_attention(case["q"], case["k"], case["v"], case["k_global"], case["v_global"],
                                query_frames=range(total), key_frames=range(total), total_frames=total,
                                padding=PADDING, scale=case["scale"], local_bias=local_bias,
                                global_bias=global_bias, chunk_size=1, split_invariant=False,
                                tokens_per_frame=case["tokens"])


def stacked(case: dict[str, Any], group: int) -> Any:
    import torch
    import torch.nn.functional as F

    q, k, v, total, tokens = case["q"], case["k"], case["v"], case["total"], case["tokens"]
    span = 2 * PADDING + 1
    interior = range(PADDING, total - PADDING) if total >= span else range(0)
    out = torch.empty_like(q)
    num_global = case["k_global"].shape[-2]
    mask = torch.cat([q.new_full((1, span * tokens), LOCAL_BIAS), q.new_full((1, num_global), GLOBAL_BIAS)], -1)
    heads, dim = q.shape[1], q.shape[-1]
    for start in range(interior.start, interior.stop, group):
        frames = range(start, min(start + group, interior.stop))
        n = len(frames)
        # (n, heads, span*tokens, d): frame f's window starts at f - PADDING
        local = torch.stack([k[0, :, (f - PADDING) * tokens : (f + PADDING + 1) * tokens] for f in frames])
        local_v = torch.stack([v[0, :, (f - PADDING) * tokens : (f + PADDING + 1) * tokens] for f in frames])
        keys = torch.cat([local, case["k_global"].expand(n, -1, -1, -1)], dim=-2)
        values = torch.cat([local_v, case["v_global"].expand(n, -1, -1, -1)], dim=-2)
        queries = q[0, :, frames.start * tokens : frames.stop * tokens].reshape(heads, n, tokens, dim).transpose(0, 1)
        got = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=case["scale"])
        out[0, :, frames.start * tokens : frames.stop * tokens] = got.transpose(0, 1).reshape(heads, n * tokens, dim)
    edges = [f for f in range(total) if f not in interior]
    if edges:  # the clip's first and last PADDING frames: shorter windows, as the engine computes them
        edge_out = engine(case)
        for f in edges:
            out[..., f * tokens : (f + 1) * tokens, :] = edge_out[..., f * tokens : (f + 1) * tokens, :]
    return out


def engine_flex(case: dict[str, Any]) -> Any:
    from video_infinity.engine.flex import band_attention

    total = case["total"]
    return band_attention(case["q"], case["k"], case["v"], case["k_global"], case["v_global"],
                          query_frames=range(total), key_frames=range(total), total_frames=total, left=PADDING,
                          right=PADDING, scale=case["scale"], local_bias=LOCAL_BIAS, global_bias=GLOBAL_BIAS,
                          tokens_per_frame=case["tokens"])


def attention_flops(total: int, tokens: int, heads: int, head_dim: int) -> int:
    """4 x queries x keys each x head dim x heads: each query frame's window (clipped) plus the globals."""
    keys = sum(min(total, f + PADDING + 1) - max(0, f - PADDING) + TOP_K for f in range(total)) * tokens
    return 4 * tokens * keys * head_dim * heads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[21, 81], help="latent frames of the clip")
    parser.add_argument("--group", type=int, default=8, help="query frames per call of the stacked variant")
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_gpu_args(parser)
    import torch

    setup_logging()
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    heads, head_dim, tokens = (2, 16, 6) if args.smoke else (HEADS, HEAD_DIM, TOKENS)
    frames_list = [20] if args.smoke else args.frames
    rows = []
    for total in frames_list:
        case = build(total, device, dtype, heads, head_dim, tokens)
        variants: dict[str, Callable[[], Any]] = {
            "engine_sdpa": lambda: engine(case),
            "engine_flat": lambda: engine(case, 0.0, 0.0),
            "stacked": lambda: stacked(case, args.group),
            "engine_flex": lambda: engine_flex(case),
        }
        with torch.no_grad():
            reference = engine(case).float()
            scale = reference.abs().max().item()
            started = time.perf_counter()
            first = variants["engine_flex"]()
            if device == "cuda":
                torch.cuda.synchronize()
            first_flex_seconds = time.perf_counter() - started
            difference = {"engine_flex": (first.float() - reference).abs().max().item() / scale,
                          "stacked": (variants["stacked"]().float() - reference).abs().max().item() / scale}
            del first
            times = interleaved(variants, 1 if args.smoke else args.repeats, warmup=1, device=device)
        flops = attention_flops(total, tokens, heads, head_dim)
        row = {"latent_frames": total, "globals": case["globals"], "tflop": round(flops / 1e12, 3),
               "first_engine_flex_call_seconds": round(first_flex_seconds, 3),
               "relative_difference_to_engine": {k: float(f"{d:.3g}") for k, d in difference.items()},
               "seconds_median": {k: round(statistics.median(t), 5) for k, t in times.items()},
               "seconds": {k: [round(x, 5) for x in t] for k, t in times.items()}}
        row["tflop_per_s"] = {k: round(flops / 1e12 / s, 1) for k, s in row["seconds_median"].items()}
        row["time_over_engine_sdpa"] = {k: round(s / row["seconds_median"]["engine_sdpa"], 3)
                                   for k, s in row["seconds_median"].items()}
        rows.append(row)
        logger.info("%d latent frames (%.1f TFLOP): %s; differences %s", total, flops / 1e12,
                    ", ".join(f"{k} {s * 1e3:.1f} ms ({row['tflop_per_s'][k]} TFLOP/s)"
                              for k, s in row["seconds_median"].items()), row["relative_difference_to_engine"])
        bad = {k: d for k, d in difference.items() if not d <= (1e-5 if args.smoke else 2e-2)}
        if bad:
            logger.error("candidates differ from the engine's result: %s", bad)
            return 1
    if args.smoke:
        logger.info("smoke run: nothing written")
        return 0
    info = machine()
    labels = copy_labels(args.commit, info.get("gpu"), "band_attention.py")
    write_result("band_attention", {
        "what": "one layer's band self-attention at Wan2.1-1.3B's shape: the engine's per-query-frame calls "
                "(attn.kernel sdpa) against one kernel per clip (attn.kernel flex) and a stacked "
                "candidate",
        "shape": {"heads": heads, "head_dim": head_dim, "tokens_per_latent_frame": tokens, "padding": PADDING,
                  "top_k": TOP_K, "local_bias": LOCAL_BIAS, "global_bias": GLOBAL_BIAS, "dtype": str(dtype),
                  "group": args.group},
        "machine": info, "rows": rows}, MEASURES, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
