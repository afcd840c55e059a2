"""Communication volume: bytes each rank sends per denoising step (one UNet call, CFG batch 2).

1. Measured: real gloo processes (world 2, 3, 4, plus a world of clips shorter than the attention
   window), counted by the engine itself (``ClipContext.stats``, per kind: ``conv_halo``,
   ``attn_halo``, ``global``, ``norm``), checked against the analytic formula below.
2. By formula only: Video-Infinity's original design vs this engine for world sizes 2 to 64, at
   VideoCrafter2's size (40x64 latents, float16, 24 frames per rank), plotted as bytes per rank.

The formula, from the UNet config (layer list: ``temporal_layers``), for rank r of w, clip
[s_r, e_r) of a T-frame video, batch B, element size E:
  * every TemporalConvLayer (C channels at H x W): the frames of rank r that lie in another rank's
    clip widened by h = 4 frames each side (4 stacked kernel-3 convs) -- 4 per neighbour when clips
    are >= 4 frames -- times B*C*H*W*E;
  * every temporal attention (attn1 and attn2 of each TransformerTemporalModel, transformer_in
    included; hidden states of width D = heads * head_dim): the same with h = min(padding, T-1),
    times B*H*W*D*E; plus the global frames: the owner of each of the min(top_k, T) global frames
    (centres of equal bins of the video) sends it to each other rank whose widened clip does not
    already hold it;
  * every temporal GroupNorm (4 per TemporalConvLayer, 1 per TransformerTemporalModel; G groups,
    norm_scope "video"): its (count, mean, M2) float64 moments, 3*B*G*8 bytes, to each of w-1 ranks.
The original design, as modelled here from the original Video-Infinity code, same notation: attention halos by all-gather inside each 2-rank
group of neighbours, `padding` frames of k AND v (2*D wide); conv halos likewise (4 frames of the
layer input); global frames: an all-gather over all ranks in which each rank contributes
max(1, top_k // w) frames of k and v (counted as a ring all-gather: (w-1) contributions sent per
rank); GroupNorm not synchronised (switched off in its code).

    python benchmarks/communication.py [--worlds 2 3 4] [--frames-per-rank 16] [--latent 16]
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Any

from _common import (BENCH_UNET, UNET3D_ENGINE, VIDEOCRAFTER2_UNET, RESULTS, machine, mib, run_ranks, setup_logging,
                     write_result)

logger = logging.getLogger("communication")
MEASURES = UNET3D_ENGINE
"""Bytes counted by the engine itself (``ClipContext.stats``) in the ranks; the formulas are this script's."""

KINDS = ("conv_halo", "attn_halo", "global", "norm")
CONV_HALO = 4
"""Halo of a TemporalConvLayer: its four kernel-3 temporal convolutions reach 1 frame each."""
NORMS_PER_CONV_LAYER = 4
MOMENT_BYTES = 3 * 8
"""(count, mean, M2) in float64 per (sample, group)."""


# ------------------------------------------------------------------------------------------------
# The UNet's temporal layers, from its config
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalConv:
    channels: int
    height: int
    width: int
    groups: int


@dataclass(frozen=True)
class TemporalTransformer:
    channels: int
    inner_dim: int
    height: int
    width: int
    groups: int
    attentions: int = 2  # attn1 and attn2 (both temporal self-attention: double_self_attention)


def temporal_layers(config: dict[str, Any], height: int, width: int) -> tuple[list[TemporalConv], list[TemporalTransformer]]:
    """TemporalConvLayers and TransformerTemporalModels of a diffusers UNet3DConditionModel, with
    the channels and latent resolution each sees; latents of height x width."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    per_block = config["layers_per_block"]
    groups = config["norm_num_groups"]
    head_dim = config["attention_head_dim"]
    # diffusers' UNet3D naming quirk: attention_head_dim is the number of heads when
    # num_attention_heads is not given.
    heads = config.get("num_attention_heads") or head_dim
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))  # kernel-3, stride-2, padding-1 downsampler

    convs: list[TemporalConv] = []
    transformers = [TemporalTransformer(channels[0], 8 * head_dim, *sizes[0], groups)]  # transformer_in: 8 heads
    for level, block in enumerate(config["down_block_types"]):
        for _ in range(per_block):
            convs.append(TemporalConv(channels[level], *sizes[level], groups))
            if "CrossAttn" in block:
                c = channels[level]
                transformers.append(TemporalTransformer(c, c // heads[level] * heads[level], *sizes[level], groups))
    c = channels[-1]  # mid block: temp_conv, then (attention, temp_attention, resnet, temp_conv) once
    convs += [TemporalConv(c, *sizes[-1], groups)] * 2
    transformers.append(TemporalTransformer(c, c // heads[-1] * heads[-1], *sizes[-1], groups))
    for index, block in enumerate(config["up_block_types"]):
        level = levels - 1 - index
        c, n_heads = channels[level], heads[level]
        for _ in range(per_block + 1):
            convs.append(TemporalConv(c, *sizes[level], groups))
            if "CrossAttn" in block:
                transformers.append(TemporalTransformer(c, c // n_heads * n_heads, *sizes[level], groups))
    return convs, transformers


# ------------------------------------------------------------------------------------------------
# Frame counts
# ------------------------------------------------------------------------------------------------


def clips(total_frames: int, world: int) -> list[tuple[int, int]]:
    """Contiguous clips [start, stop), sizes differing by at most one (the larger ones first)."""
    base, extra = divmod(total_frames, world)
    out, start = [], 0
    for r in range(world):
        size = base + (r < extra)
        out.append((start, start + size))
        start += size
    return out


def halo_frames_sent(total_frames: int, world: int, rank: int, halo: int) -> int:
    """Frames rank ``rank`` sends so that every other rank holds its clip widened by ``halo`` each side."""
    parts = clips(total_frames, world)
    s, e = parts[rank]
    sent = 0
    for peer, (ps, pe) in enumerate(parts):
        if peer != rank:
            lo, hi = max(s, ps - halo, 0), min(e, pe + halo, total_frames)
            sent += max(0, hi - lo)
    return sent


def global_frames_sent(total_frames: int, world: int, rank: int, top_k: int, halo: int) -> int:
    """Global frames (centres of min(top_k, T) equal bins) that rank ``rank`` owns, counted once per
    other rank whose clip widened by ``halo`` each side does not hold them."""
    k = max(0, min(top_k, total_frames))
    parts = clips(total_frames, world)
    s, e = parts[rank]
    mine = [f for f in (((2 * j + 1) * total_frames) // (2 * k) for j in range(k)) if s <= f < e]
    return sum(1 for peer, (ps, pe) in enumerate(parts) if peer != rank
               for f in mine if not max(ps - halo, 0) <= f < min(pe + halo, total_frames))


def neighbours(world: int, rank: int) -> int:
    return (rank > 0) + (rank < world - 1)


# ------------------------------------------------------------------------------------------------
# Bytes per rank per UNet call
# ------------------------------------------------------------------------------------------------


def engine_bytes(config: dict[str, Any], height: int, width: int, batch: int, element: int, total_frames: int,
                 world: int, rank: int, padding: int = 8, top_k: int = 16, norm_scope: str = "video") -> dict[str, int]:
    """Bytes rank ``rank`` sends per UNet call, per kind, by the formula in the module docstring."""
    convs, transformers = temporal_layers(config, height, width)
    out = dict.fromkeys(KINDS, 0)
    if world == 1:
        return out
    conv_frames = halo_frames_sent(total_frames, world, rank, CONV_HALO)
    attn_halo = min(padding, total_frames - 1)
    attn_frames = halo_frames_sent(total_frames, world, rank, attn_halo)
    global_frames = global_frames_sent(total_frames, world, rank, top_k, attn_halo)
    moments = MOMENT_BYTES * batch * (world - 1) if norm_scope == "video" else 0
    for conv in convs:
        out["conv_halo"] += conv_frames * batch * conv.channels * conv.height * conv.width * element
        out["norm"] += NORMS_PER_CONV_LAYER * moments * conv.groups
    for t in transformers:
        frame = batch * t.height * t.width * t.inner_dim * element
        out["attn_halo"] += t.attentions * attn_frames * frame
        out["global"] += t.attentions * global_frames * frame
        out["norm"] += moments * t.groups
    return out


def original_bytes(config: dict[str, Any], height: int, width: int, batch: int, element: int, world: int, rank: int,
                   padding: int = 8, top_k: int = 16) -> dict[str, int]:
    """Bytes rank ``rank`` sends per UNet call in the original design (see the module docstring)."""
    convs, transformers = temporal_layers(config, height, width)
    out = dict.fromkeys(KINDS, 0)
    if world == 1:
        return out
    pairs = neighbours(world, rank)
    per_rank_global = max(1, top_k // world)
    for conv in convs:
        out["conv_halo"] += pairs * CONV_HALO * batch * conv.channels * conv.height * conv.width * element
    for t in transformers:
        kv_frame = batch * t.height * t.width * 2 * t.inner_dim * element  # k and v
        out["attn_halo"] += t.attentions * pairs * padding * kv_frame
        out["global"] += t.attentions * (world - 1) * per_rank_global * kv_frame
    return out


# ------------------------------------------------------------------------------------------------
# Measured in real processes
# ------------------------------------------------------------------------------------------------


def _measure_rank(rank: int, world: int, frames_per_rank: int, total_frames: int, latent: int, batch: int,
                  settings: dict[str, Any]) -> dict[str, Any]:
    import torch

    from _common import bench_inputs, build_unet
    from video_infinity import parallelize
    from video_infinity.context import ClipContext

    unet = build_unet(BENCH_UNET, latent)
    ctx = ClipContext.from_process_group(total_frames)
    parallelize(unet, settings, ctx)
    sample, text = bench_inputs(rank, len(ctx.frames), latent, batch)
    per_call = []
    for timestep in (900, 500):  # both phases of the dual-scope biases (the traffic must not change)
        ctx.stats.reset()
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=text)
        per_call.append(dict(ctx.stats.sent_bytes))
    return {"rank": rank, "frames": [ctx.frames.start, ctx.frames.stop], "sent_bytes": per_call[0],
            "same_every_call": per_call[0] == per_call[1]}


def measure(world: int, total_frames: int, latent: int, batch: int, settings: dict[str, Any]) -> list[dict[str, Any]]:
    return run_ranks(_measure_rank, world, total_frames // world, total_frames, latent, batch, settings)


# ------------------------------------------------------------------------------------------------


def _plot(scan: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [row["world"] for row in scan]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    left.plot(worlds, [mib(r["engine_halo_max"]) for r in scan], "o-", ms=3, label="this engine: halos (conv + attention)")
    left.plot(worlds, [mib(r["original_halo_max"]) for r in scan], "s--", ms=3, label="original: halos (k and v)")
    left.set_title("halo traffic per rank per step")
    right.plot(worlds, [mib(r["engine_total_max"]) for r in scan], "o-", ms=3, label="this engine: total, busiest rank")
    right.plot(worlds, [mib(r["engine_total_mean"]) for r in scan], "o:", ms=3, label="this engine: total, mean over ranks")
    right.plot(worlds, [mib(r["original_total_max"]) for r in scan], "s--", ms=3, label="original: total, busiest rank")
    right.plot(worlds, [mib(r["engine_global_max"]) for r in scan], "^-", ms=3, alpha=0.6, label="this engine: global frames, busiest rank")
    right.set_title("all traffic per rank per step (halos + global frames + norms)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds if len(worlds) < 12 else [w for w in worlds if w & (w - 1) == 0])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("world size (GPUs), 24 frames per rank")
        ax.set_ylabel("MiB sent per rank per UNet call")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("VideoCrafter2 UNet, 40x64 latents, float16, CFG batch 2, padding 8, top_k 16 (by formula)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--frames-per-rank", type=int, default=16)
    parser.add_argument("--short-clips", type=int, nargs=2, default=[4, 20], metavar=("WORLD", "TOTAL_FRAMES"),
                        help="one more measured case whose clips are shorter than the attention window")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--padding", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--scan-max-world", type=int, default=64)
    args = parser.parse_args()
    setup_logging()
    info = machine()
    settings = {"attn": {"padding": args.padding, "top_k": args.top_k}}
    element = 4  # float32 on CPU

    cases = [(w, w * args.frames_per_rank) for w in args.worlds]
    if args.short_clips and args.short_clips[0] > 1:
        cases.append(tuple(args.short_clips))
    measured_rows, all_match = [], True
    logger.info("measured in gloo processes (UNet %s, %dx%d latents, batch %d, float32) vs formula, bytes per rank per call",
                BENCH_UNET["block_out_channels"], args.latent, args.latent, args.batch)
    logger.info("%5s %6s %4s %9s  %-10s %14s %14s %6s", "world", "frames", "rank", "clip", "kind", "measured", "formula", "match")
    for world, total in cases:
        ranks = measure(world, total, args.latent, args.batch, settings)
        for result in ranks:
            rank = result["rank"]
            formula = engine_bytes(BENCH_UNET, args.latent, args.latent, args.batch, element, total, world, rank,
                                   args.padding, args.top_k)
            for kind in KINDS:
                got = result["sent_bytes"].get(kind, 0)
                match = got == formula[kind]
                all_match &= match and result["same_every_call"]
                measured_rows.append({"world": world, "total_frames": total, "rank": rank, "clip": result["frames"],
                                      "kind": kind, "measured": got, "formula": formula[kind], "match": match})
                logger.info("%5d %6d %4d %9s  %-10s %14d %14d %6s", world, total, rank, "%d-%d" % tuple(result["frames"]),
                            kind, got, formula[kind], "yes" if match else "NO")
    logger.info("measured == formula for every rank and kind: %s", "yes" if all_match else "NO")

    # By formula: the original design vs this engine at VideoCrafter2's size, weak scaling.
    vc_h, vc_w, vc_frames, fp16 = 40, 64, 24, 2
    scan = []
    for world in range(2, args.scan_max_world + 1):
        total = world * vc_frames
        ours = [engine_bytes(VIDEOCRAFTER2_UNET, vc_h, vc_w, 2, fp16, total, world, r, args.padding, args.top_k)
                for r in range(world)]
        orig = [original_bytes(VIDEOCRAFTER2_UNET, vc_h, vc_w, 2, fp16, world, r, args.padding, args.top_k)
                for r in range(world)]
        halo = [o["conv_halo"] + o["attn_halo"] for o in ours]
        orig_halo = [o["conv_halo"] + o["attn_halo"] for o in orig]
        totals = [sum(o.values()) for o in ours]
        orig_totals = [sum(o.values()) for o in orig]
        scan.append({
            "world": world, "total_frames": total,
            "engine_halo_max": max(halo), "engine_global_max": max(o["global"] for o in ours),
            "engine_global_mean": sum(o["global"] for o in ours) / world,
            "engine_norm_max": max(o["norm"] for o in ours),
            "engine_total_max": max(totals), "engine_total_mean": sum(totals) / world,
            "original_halo_max": max(orig_halo), "original_global_max": max(o["global"] for o in orig),
            "original_total_max": max(orig_totals), "original_total_mean": sum(orig_totals) / world,
            "engine_busiest_rank": {k: ours[max(range(world), key=lambda r: totals[r])][k] for k in KINDS},
        })
    logger.info("")
    logger.info("by formula: VideoCrafter2 UNet, %dx%d latents, float16, batch 2, %d frames per rank, padding %d, "
                "top_k %d; MiB sent per rank per UNet call", vc_h, vc_w, vc_frames, args.padding, args.top_k)
    logger.info("%5s | %10s %10s %10s %10s %10s | %10s %10s %10s", "world", "halo", "global max", "norm", "total max",
                "total mean", "orig halo", "orig glob", "orig total")
    for row in scan:
        if row["world"] in (2, 3, 4, 8, 16, 17, 24, 32, 48, 64) or row["world"] == args.scan_max_world:
            logger.info("%5d | %10.1f %10.1f %10.3f %10.1f %10.1f | %10.1f %10.1f %10.1f", row["world"],
                        mib(row["engine_halo_max"]), mib(row["engine_global_max"]), mib(row["engine_norm_max"]),
                        mib(row["engine_total_max"]), mib(row["engine_total_mean"]), mib(row["original_halo_max"]),
                        mib(row["original_global_max"]), mib(row["original_total_max"]))
    halo_flat = len({row["engine_halo_max"] for row in scan if row["world"] >= 3}) == 1
    logger.info("this engine's halo traffic per rank is %s for world sizes 3..%d (world 2: the end ranks have one "
                "neighbour)", "constant" if halo_flat else "NOT constant", args.scan_max_world)
    plot = RESULTS / "communication.png"
    RESULTS.mkdir(exist_ok=True)
    _plot(scan, plot)
    logger.info("plot: %s", plot.relative_to(RESULTS.parent.parent))
    write_result("communication", {
        "machine": info, "bench_unet": BENCH_UNET, "latent": args.latent, "batch": args.batch, "dtype": "float32",
        "settings": settings, "measured": measured_rows, "measured_equals_formula": all_match,
        "scan": {"unet": VIDEOCRAFTER2_UNET, "latent": [vc_h, vc_w], "dtype": "float16", "batch": 2,
                 "frames_per_rank": vc_frames, "padding": args.padding, "top_k": args.top_k, "rows": scan,
                 "engine_halo_constant_for_world_3_up": halo_flat},
        "plot": "communication.png",
    }, MEASURES)


if __name__ == "__main__":
    main()
