"""Dual-scope temporal attention: the math as a pure function, and the diffusers attention processor.

Query frame g (global index) attends to
  * local keys: every frame j of the video with |g - j| <= padding (clipped at the video ends), and
  * global keys: ``top_k`` frames at fixed global indices, the same for every rank.
Phase biases are added to the local and global logits; ``token_num_scale`` multiplies the softmax
scale of each query by log(number of keys it attends)/log(16).

A frame may hold many tokens (a DiT's latent frame is H'xW' tokens, laid out frame-major): every
token of frame g attends every token of g's key frames. Memory is linear in frames: queries are
processed in chunks, and a query only ever sees the keys its window can reach, so no frames x frames
(or tokens x tokens) matrix of the whole video is built. With ``split_invariant`` the arithmetic
of a query does not depend on the split of the video, so any number of ranks gives the same bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .config import EngineConfig
from .context import ClipContext, DenoiseState
from .frames import global_frame_indices, intersect
from .halo import start_exchange


def dual_scope_attention(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    *,
    query_frames: range,
    key_frames: range,
    total_frames: int,
    padding: int,
    scale: float,
    local_bias: float = 0.0,
    global_bias: float = 0.0,
    token_num_scale: bool = False,
    chunk_size: int = 64,
    split_invariant: bool = True,
    tokens_per_frame: int = 1,
) -> torch.Tensor:
    """Windowed softmax attention over local keys plus global keys.

    Shapes, with T = ``tokens_per_frame`` tokens per frame laid out frame-major: ``q`` (..., Fq*T, d)
    for the frames ``query_frames``; ``k_local``/``v_local`` (..., Fk*T, d) for the frames
    ``key_frames`` (must contain every query's window, clipped to the video of ``total_frames``
    frames); ``k_global``/``v_global`` (..., G*T, d). Returns (..., Fq*T, dv). ``token_num_scale``
    counts key tokens.

    ``split_invariant``: a query's arithmetic depends only on its global frame index, never on which
    other frames share the call: each query frame is computed on its own, over exactly its window's
    keys, with matrix products whose shapes depend on that frame alone (kernels pick their algorithm
    by shape). The video is then bit-identical however it is split over ranks or chunked. Otherwise
    fused attention over each chunk's key span (faster on GPUs, the same up to rounding).
    """
    tokens = tokens_per_frame
    if len(query_frames) * tokens != q.shape[-2] or len(key_frames) * tokens != k_local.shape[-2]:
        raise ValueError("query_frames/key_frames (times tokens_per_frame) do not match the tensors' token counts")
    padding = min(padding, total_frames - 1)
    kernel = _per_query_attention if split_invariant else _fused_attention
    outputs = []
    for c0 in range(0, len(query_frames), chunk_size):
        chunk = query_frames[c0 : c0 + chunk_size]
        span = intersect(range(chunk.start - padding, chunk.stop + padding), range(total_frames))
        if intersect(span, key_frames) != span:
            raise ValueError(f"key_frames {key_frames} lack frames of the windows of queries {chunk}")
        k0 = (span.start - key_frames.start) * tokens
        keys = slice(k0, k0 + len(span) * tokens)
        outputs.append(kernel(
            q[..., c0 * tokens : (c0 + len(chunk)) * tokens, :], k_local[..., keys, :], v_local[..., keys, :],
            k_global, v_global, chunk=chunk, span=span, padding=padding, scale=scale, local_bias=local_bias,
            global_bias=global_bias, token_num_scale=token_num_scale, tokens=tokens,
        ))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def _per_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_global: torch.Tensor,
                         v_global: torch.Tensor, *, chunk: range, span: range, padding: int, scale: float,
                         local_bias: float, global_bias: float, token_num_scale: bool, tokens: int) -> torch.Tensor:
    """One chunk, one query frame at a time: frame g's keys are exactly its window clipped to the
    video (``span`` holds them all), then the global keys. Every matrix product has shapes fixed by g
    alone, with the other axes (batch, heads, and spatial positions for a UNet) as its batch, so g's
    arithmetic is the same in any split."""
    lead = q.shape[:-2]
    batch = math.prod(lead)

    def flat(t: torch.Tensor) -> torch.Tensor:  # (batch * heads, tokens, d)
        return t.reshape(batch, t.shape[-2], t.shape[-1])

    q, keys, values, k_global, v_global = flat(q), flat(keys), flat(values), flat(k_global), flat(v_global)
    num_global = k_global.shape[1]
    outputs = []
    for i, frame in enumerate(chunk):
        first, stop = max(frame - padding, span.start), min(frame + padding + 1, span.stop)
        local = slice((first - span.start) * tokens, (stop - span.start) * tokens)
        num_local = (stop - first) * tokens
        window_keys, window_values = keys[:, local], values[:, local]
        query = q[:, i * tokens : (i + 1) * tokens].transpose(1, 2)  # (batch, d, T)
        query_scale = scale * (math.log(num_local + num_global) / math.log(16.0) if token_num_scale else 1.0)
        logits = torch.bmm(window_keys, query).transpose(1, 2) * query_scale + local_bias  # (batch, T, keys)
        if num_global:
            logits = torch.cat([logits, torch.bmm(k_global, query).transpose(1, 2) * query_scale + global_bias], -1)
        weights = torch.softmax(logits, dim=-1)
        out = torch.bmm(weights[..., :num_local], window_values)
        if num_global:
            out = out + torch.bmm(weights[..., num_local:], v_global)
        outputs.append(out)
    return torch.cat(outputs, dim=1).view(*lead, len(chunk) * tokens, -1)


def _fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_global: torch.Tensor,
                     v_global: torch.Tensor, *, chunk: range, span: range, padding: int, scale: float,
                     local_bias: float, global_bias: float, token_num_scale: bool, tokens: int) -> torch.Tensor:
    """One chunk with one fused attention call over the chunk's key span, masked to each query's window."""
    num_global = k_global.shape[-2]
    num_local = len(span) * tokens
    if num_global:
        keys, values = torch.cat([keys, k_global], dim=-2), torch.cat([values, v_global], dim=-2)
    if max(chunk[-1] - span.start, span[-1] - chunk.start) <= padding:
        # Every query of the chunk sees every key of the span: the mask is constant per key
        # column, and a bias shared by all keys cancels in the softmax.
        mask = None
        if num_global and local_bias != global_bias:
            mask = torch.cat([q.new_full((1, num_local), local_bias), q.new_full((1, num_global), global_bias)], -1)
        if token_num_scale:
            scale = scale * math.log(num_local + num_global) / math.log(16.0)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    q_idx = torch.arange(chunk.start, chunk.stop, device=q.device).repeat_interleave(tokens)
    k_idx = torch.arange(span.start, span.stop, device=q.device).repeat_interleave(tokens)
    in_window = (q_idx[:, None] - k_idx[None, :]).abs() <= padding
    mask = torch.full(in_window.shape, float("-inf"), dtype=q.dtype, device=q.device)
    mask.masked_fill_(in_window, local_bias)
    if num_global:
        mask = torch.cat([mask, mask.new_full((len(q_idx), num_global), global_bias)], dim=-1)
    if token_num_scale:
        num_keys = in_window.sum(-1).to(torch.float64) + num_global
        q = q * (torch.log(num_keys) / math.log(16.0)).to(q.dtype)[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _project_keys_values(
    attn: Attention, context: torch.Tensor, context_frames: range, global_states: torch.Tensor, global_frames: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of the local window, and of the global frames (in ``global_frames`` order).

    A global frame inside the window (on one process: all of them) takes its rows of the window's
    projection; only the others are projected, so no frame goes through ``to_k``/``to_v`` twice.
    """
    key, value = attn.to_k(context), attn.to_v(context)
    if not global_frames:
        return key, value, key[:, :0], value[:, :0]
    inside = [i for i, frame in enumerate(global_frames) if frame in context_frames]
    outside = [i for i, frame in enumerate(global_frames) if frame not in context_frames]
    device = context.device
    rows = torch.tensor([global_frames[i] - context_frames.start for i in inside], dtype=torch.long, device=device)
    global_key, global_value = key.index_select(1, rows), value.index_select(1, rows)
    if outside:
        remote = global_states.index_select(1, torch.tensor(outside, dtype=torch.long, device=device))
        global_key = torch.cat([global_key, attn.to_k(remote)], dim=1)
        global_value = torch.cat([global_value, attn.to_v(remote)], dim=1)
        # Back to the order of ``global_frames`` (every rank sums the global keys in the same order).
        restore = torch.tensor(sorted(range(len(global_frames)), key=(inside + outside).__getitem__), device=device)
        global_key, global_value = global_key.index_select(1, restore), global_value.index_select(1, restore)
    return key, value, global_key, global_value


class DualScopeAttnProcessor:
    """Attention processor for temporal self-attention (sequence axis = frames) over a clip of the video."""

    def __init__(self, config: EngineConfig, ctx: ClipContext, state: DenoiseState) -> None:
        self.engine_config = config
        self.config = config.attn
        self.ctx = ctx
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError(
                "dual-scope attention handles temporal self-attention only (no encoder states, no mask)"
            )
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.dim() != 3:
            raise NotImplementedError("dual-scope attention expects (batch, frames, channels) inputs without norms")
        layout = self.state.layout
        config = self.config
        timestep = self.state.timestep
        residual = hidden_states

        padding = min(config.padding, layout.total_frames - 1)
        global_frames = global_frame_indices(layout.total_frames, config.global_frame_count(timestep))
        pending = start_exchange(hidden_states, 1, layout, padding, padding, self.ctx, global_frames, kind="attn_halo")
        query = attn.to_q(hidden_states)  # while the neighbours' frames are in flight
        context, context_frames, global_states = pending.wait()
        key, value, global_key, global_value = _project_keys_values(
            attn, context, context_frames, global_states, global_frames
        )

        batch = hidden_states.shape[0]
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        global_key, global_value = heads(global_key), heads(global_value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key, global_key = attn.norm_k(key), attn.norm_k(global_key)

        local_bias, global_bias = config.phase_biases(timestep)
        out = dual_scope_attention(
            query,
            key,
            value,
            global_key,
            global_value,
            query_frames=layout.owned,
            key_frames=context_frames,
            total_frames=layout.total_frames,
            padding=padding,
            scale=attn.scale * config.attn_scale,
            local_bias=local_bias,
            global_bias=global_bias,
            token_num_scale=config.token_num_scale,
            chunk_size=config.query_chunk_size,
            split_invariant=self.engine_config.split_invariant_on(hidden_states.device.type),
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
