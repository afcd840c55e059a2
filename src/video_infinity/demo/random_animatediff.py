"""Tiny AnimateDiff folders with random weights, for tests and benchmarks (no model hub needed).

Two layouts, both loaded by :func:`video_infinity.families.animatediff.load_animatediff` exactly as real
checkpoints are: a saved ``AnimateDiffPipeline`` folder, or a Stable Diffusion pipeline folder plus a
``MotionAdapter`` folder (what users combine with ``UNetMotionModel.from_unet2d``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel

from .random_model import MAX_LENGTH, SCHEDULER_CONFIG, _vae, _write_tokenizer, build_vocab

if TYPE_CHECKING:
    from transformers import CLIPTextModel

logger = logging.getLogger(__name__)

__all__ = ["build_random_animatediff", "random_motion_unet_parts"]

TEXT_DIM = 32
"""Hidden size of the random CLIP text encoder (the UNet's cross-attention dimension)."""


def random_motion_unet_parts(seed: int = 0, sample_size: int = 8, block_out_channels: tuple[int, ...] = (16, 32),
                             layers_per_block: int = 1, norm_num_groups: int = 4, attention_head_dim: int = 8,
                             motion_heads: int = 2, cross_attention_dim: int = TEXT_DIM, fill_zeros: bool = True,
                             ) -> tuple[UNet2DConditionModel, MotionAdapter]:
    """A random SD-style UNet (cross-attention in all but the last level) and a matching motion adapter.

    Every weight is random: diffusers zero-initialises the motion modules' output projections, which
    would make an untrained adapter a no-op and hide every temporal path (``fill_zeros``; off for
    shape-only models on the meta device).
    """
    levels = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        )
        adapter = MotionAdapter(
            block_out_channels=block_out_channels, motion_layers_per_block=layers_per_block,
            motion_num_attention_heads=motion_heads, motion_norm_num_groups=norm_num_groups,
            motion_max_seq_length=32, use_motion_mid_block=True,
        )
        with torch.no_grad():
            for module in (unet, adapter) if fill_zeros else ():
                for p in module.parameters():
                    if not torch.any(p):
                        p.normal_(0.0, 0.05)
    return unet, adapter


def _text_encoder(seed: int, vocab: dict[str, int], hidden_size: int) -> "CLIPTextModel":
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=hidden_size,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        ))


def build_random_animatediff(path: str | Path, seed: int = 0, layout: str = "pipeline", sample_size: int = 8,
                             **unet_options: object) -> Path:
    """Write a random tiny AnimateDiff model to ``path`` and return ``path``.

    ``layout="pipeline"``: an ``AnimateDiffPipeline`` folder. ``layout="base+adapter"``: ``path/base`` (a
    ``StableDiffusionPipeline`` folder) and ``path/motion_adapter``. ``unet_options`` go to
    :func:`random_motion_unet_parts` (sizes); the random CLIP text encoder (2 layers) has the UNet's
    cross-attention width, the VAE is tiny whatever the UNet's size.
    """
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if layout not in ("pipeline", "base+adapter"):
        raise ValueError(f"layout must be 'pipeline' or 'base+adapter', got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    _write_tokenizer(path / "_tokenizer", vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(path / "_tokenizer")
    unet2d, adapter = random_motion_unet_parts(seed, sample_size, **unet_options)
    with torch.random.fork_rng(devices=[]):
        vae = _vae(seed, sample_size)
    text_encoder = _text_encoder(seed, vocab, unet2d.config.cross_attention_dim)
    scheduler = DDIMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if layout == "pipeline":
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        AnimateDiffPipeline(unet=unet, motion_adapter=adapter, **parts).save_pretrained(path)
    else:
        StableDiffusionPipeline(unet=unet2d, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False, **parts).save_pretrained(path / "base")
        adapter.save_pretrained(path / "motion_adapter")
    logger.info("wrote a random tiny AnimateDiff model (%s) to %s", layout, path)
    return path
