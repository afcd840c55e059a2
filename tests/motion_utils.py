"""A tiny random AnimateDiff UNet (UNet2DConditionModel + MotionAdapter -> UNetMotionModel) saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

CROSS_ATTENTION_DIM = 16


def build_tiny_motion_unet(path: Path, seed: int = 0, cross_attention_dim: int = CROSS_ATTENTION_DIM) -> Path:
    """A random tiny UNetMotionModel built the way real ones are (``from_unet2d``), saved with
    save_pretrained. Every weight is random (diffusers zero-initialises some motion projections),
    so every temporal path changes the output."""
    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )
    adapter = MotionAdapter(
        block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=4, motion_max_seq_length=32, use_motion_mid_block=True,
    )
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    unet.save_pretrained(path)
    return path


def load_motion_unet(path: Path) -> UNetMotionModel:
    return UNetMotionModel.from_pretrained(path).eval()
