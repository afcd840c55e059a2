"""Independent references the engine is compared with: dense masked attention on the whole video."""

from __future__ import annotations

from typing import Any

import math

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def dense_band_attention(q, k, v, band, gidx, scale, local_bias, global_bias, token_num_scale):
    """Dense reference of dual-scope attention: every frame a key under the (frames x frames) ``band``
    mask, the global frames ``gidx`` appended as keys every query sees; phase biases and
    token_num_scale as the engine applies them."""
    total = q.shape[-2]
    keys = torch.cat([k, k[..., gidx, :]], dim=-2)
    values = torch.cat([v, v[..., gidx, :]], dim=-2)
    allowed = torch.cat([band, torch.ones(total, len(gidx), dtype=torch.bool)], dim=-1)
    bias = torch.cat([torch.full((total, total), local_bias, dtype=q.dtype),
                      torch.full((total, len(gidx)), global_bias, dtype=q.dtype)], dim=-1)
    factor = torch.ones(total, 1, dtype=q.dtype)
    if token_num_scale:
        factor = (torch.log(allowed.sum(-1, keepdim=True).double()) / math.log(16)).to(q.dtype)
    logits = (q @ keys.transpose(-1, -2)) * scale * factor + bias
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ values


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
    return with_self_attention(model, lambda: FrameBandMaskProcessor(x.shape[2], tokens, padding), x, t, text)


def with_self_attention(model: WanTransformer3DModel, processor: Any, x: torch.Tensor, t: torch.Tensor,
                        text: torch.Tensor) -> torch.Tensor:
    """``model(x, t, text).sample`` with every block's self-attention processor a new ``processor()``,
    the model's own processors put back afterwards."""
    originals = [block.attn1.processor for block in model.blocks]
    for block in model.blocks:
        block.attn1.set_processor(processor())
    try:
        with torch.no_grad():
            return model(x, t, text).sample
    finally:
        for block, original in zip(model.blocks, originals):
            block.attn1.set_processor(original)
