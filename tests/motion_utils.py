"""A tiny random AnimateDiff UNet (UNet2DConditionModel + MotionAdapter -> UNetMotionModel) saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNetMotionModel

from video_infinity.demo.random_animatediff import random_motion_unet_parts

CROSS_ATTENTION_DIM = 16


def build_tiny_motion_unet(path: Path, seed: int = 0, **sizes: object) -> Path:
    """A random tiny UNetMotionModel built the way real ones are (``from_unet2d``), saved with
    save_pretrained. Every weight is random and sizeable, so every temporal path changes the output.
    ``sizes`` go to :func:`random_motion_unet_parts` (channels, groups, heads)."""
    unet2d, adapter = random_motion_unet_parts(seed, cross_attention_dim=CROSS_ATTENTION_DIM, **sizes)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    unet.save_pretrained(path)
    return path


def load_motion_unet(path: Path) -> UNetMotionModel:
    return UNetMotionModel.from_pretrained(path).eval()
