"""Shared helpers for Wan tests: a tiny random WanTransformer3DModel, and diffusers' own processor
under a dense frame-band mask (the reference for the engine's windowed self-attention)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

TEXT_DIM = 16


def build_tiny_wan_transformer(seed: int = 0, rope_max_seq_len: int = 32, in_channels: int = 4,
                               ffn_dim: int = 32) -> WanTransformer3DModel:
    """2 layers, 2 heads of 12 channels. Every weight random (diffusers starts some at zero), so every path matters."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=rope_max_seq_len,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def save_tiny_wan_transformer(path: Path, seed: int = 0, ffn_dim: int = 32) -> Path:
    build_tiny_wan_transformer(seed, ffn_dim=ffn_dim).save_pretrained(path)
    return path


class FrameBandMaskProcessor(WanAttnProcessor):
    """diffusers' ``WanAttnProcessor`` given a dense boolean mask: token of latent frame i sees the
    tokens of latent frames j with |i - j| <= padding."""

    def __init__(self, frames: int, tokens_per_frame: int, padding: int) -> None:
        super().__init__()
        frame = torch.arange(frames).repeat_interleave(tokens_per_frame)
        self.mask = (frame[:, None] - frame[None, :]).abs() <= padding

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def band_reference(model: WanTransformer3DModel, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, padding: int) -> torch.Tensor:
    """Plain diffusers on the whole latent video with every self-attention limited to a frame band."""
    _, p_h, p_w = model.config.patch_size
    tokens = (x.shape[3] // p_h) * (x.shape[4] // p_w)
    originals = [block.attn1.processor for block in model.blocks]
    for block in model.blocks:
        block.attn1.set_processor(FrameBandMaskProcessor(x.shape[2], tokens, padding))
    try:
        with torch.no_grad():
            return model(x, t, text).sample
    finally:
        for block, processor in zip(model.blocks, originals):
            block.attn1.set_processor(processor)
