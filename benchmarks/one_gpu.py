"""What a Wan video needs on one GPU: one transformer call's peak memory at real size, computed on
meta tensors (no weights, no GPU), and with a CUDA GPU measured beside it.

The transformers are diffusers' ``WanTransformer3DModel`` in the configurations of Wan2.1-T2V-1.3B
(480x832: 1,560 tokens per latent frame) and Wan2.2-TI2V-5B (704x1280: 880 tokens; called as its
pipelines call it, one timestep per token), built on the meta device, bfloat16 with diffusers'
float32 modules (``_keep_in_fp32_modules``), the ``wan`` preset (padding 8, top_k 4) on one process,
the engine's GPU defaults (fused kernels), batch 1 (one CFG branch), 512 x 4,096 text embeddings.
Each call is counted with :func:`video_infinity.memory.peak_bytes` (tensor storages alive at once;
attention counted as a flash kernel allocates; the allocator's rounding comes on top on a GPU), for
``block_tokens`` at its default (frame-chunked blocks) and null (diffusers' whole-clip blocks), at
81, 321 and 1,025 frames (21, 81, 257 latent frames).

"Fits" adds the bf16 weights to the call's peak: the denoising step only. Not counted: the text
encoder (UMT5-XXL, ~11 GB bf16: encode first, then off the GPU), the VAE decode, the CUDA context
and allocator slack. N GPUs: each rank's call is extrapolated from the one-process figures (the
per-latent-frame slope times its ceil(frames / N) latent frames plus a halo of 2 x padding frames
of keys and values, plus the constant), labelled "extrapolated"; nothing here ran on N GPUs.

    python benchmarks/one_gpu.py            # writes results/one_gpu.json
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from _common import machine, mib, setup_logging, write_result

logger = logging.getLogger("one_gpu")

MODELS: dict[str, dict[str, Any]] = {
    "Wan2.1-T2V-1.3B 480x832": dict(
        config=dict(num_attention_heads=12, ffn_dim=8960, in_channels=16, out_channels=16, num_layers=30),
        latent=(60, 104), per_token_timestep=False),
    "Wan2.2-TI2V-5B 704x1280 (one timestep per token)": dict(
        config=dict(num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48, num_layers=30),
        latent=(44, 80), per_token_timestep=True),
}
COMMON = dict(attention_head_dim=128, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FRAMES = (81, 321, 1025)
GPUS_GIB = (24, 48, 80)
WORLDS = (1, 2, 4, 8)


def call_peak(model, latent: tuple[int, int], latent_frames: int, per_token: bool, block_tokens: Any) -> int:
    """One conditional call's peak (the planner's step without guidance), ``block_tokens`` over the preset's."""
    from video_infinity import ClipContext
    from video_infinity.families.wan.plan import step_measure
    from video_infinity.presets import resolve_engine

    engine = resolve_engine("wan")
    if block_tokens != "default":
        engine = engine.model_copy(update={"block_tokens": block_tokens})
    return step_measure(model, engine, ClipContext(total_frames=latent_frames), latent, per_token,
                        guidance=False).peak_bytes


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    setup_logging()
    import torch

    from video_infinity.families.wan.vae import latent_frame_count
    from video_infinity.families.wan.plan import meta_transformer
    from video_infinity.memory import parameter_bytes

    padding = 8
    results: dict[str, Any] = {}
    for name, spec in MODELS.items():
        model = meta_transformer({**COMMON, **spec["config"]}, torch.bfloat16)
        weights = parameter_bytes(model)
        entry: dict[str, Any] = {"weights_gib": round(weights / 2**30, 2), "calls": {}}
        for block_tokens in ("default", None):
            label = "frame_chunked" if block_tokens == "default" else "whole_clip"
            peaks = {}
            for frames in FRAMES:
                latent_frames = latent_frame_count(frames)
                peaks[frames] = call_peak(model, spec["latent"], latent_frames, spec["per_token_timestep"], block_tokens)
                logger.info("%s, %s, %d frames: %.0f MiB", name, label, frames, mib(peaks[frames]))
            first, last = latent_frame_count(FRAMES[1]), latent_frame_count(FRAMES[-1])
            slope = (peaks[FRAMES[-1]] - peaks[FRAMES[1]]) / (last - first)
            constant = peaks[FRAMES[-1]] - slope * last
            entry["calls"][label] = {
                "peak_mib": {str(f): round(mib(p), 1) for f, p in peaks.items()},
                "mib_per_latent_frame": round(mib(slope), 2),
                "peak_with_weights_gib": {str(f): round((p + weights) / 2**30, 2) for f, p in peaks.items()},
                "fits": {
                    f"{gib} GiB": {
                        f"{world} GPU": {
                            str(frames): {
                                "fits": (need := (constant + slope * (math.ceil(latent_frame_count(frames) / world)
                                                                      + (2 * padding if world > 1 else 0))
                                                  + weights) / 2**30) <= gib,
                                "need_gib": round(need, 2),
                                "how": "measured on meta tensors" if world == 1 else "extrapolated",
                            } for frames in FRAMES
                        } for world in WORLDS
                    } for gib in GPUS_GIB
                },
            }
        results[name] = entry
    write_result("one_gpu", {
        "what": "one Wan transformer call (batch 1) at real size on meta tensors: peak working memory, "
                "frame-chunked blocks (block_tokens default) vs diffusers' whole-clip blocks",
        "settings": {"preset": "wan", "dtype": "bfloat16", "split_invariant": False, "text_tokens": 512,
                     "frames": list(FRAMES), "counted_as": "tensor storages alive at once, flash-like attention"},
        "not_counted": "text encoder, VAE decode, CUDA context, allocator slack; N-GPU figures are extrapolated",
        "machine": machine(),
        "models": results,
    })


if __name__ == "__main__":
    main()
