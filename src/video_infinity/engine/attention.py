"""Dual-scope temporal attention: the math as a pure function, and the diffusers attention processor.

Query frame g (global index) attends to
  * local keys: every frame j of the video with |g - j| <= padding (clipped at the video ends; in a
    loop taken around the ring instead, see ``frames.attention_reach``), and
  * global keys: ``top_k`` frames at fixed global indices, the same for every rank (with
    ``global_frames="rotating"`` shifted by the denoising step's index, the same for every rank too).
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..config import EngineConfig
from ..context import ClipContext, DenoiseState, FrameLayout
from ..frames import attention_reach, global_frame_indices, intersect, ring_offset, window
from .comm import PendingFrames, start_exchange


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
    loop: bool = False,
    tokens_per_frame: int = 1,
) -> torch.Tensor:
    """Windowed softmax attention over local keys plus global keys.

    Shapes, with T = ``tokens_per_frame`` tokens per frame laid out frame-major: ``q`` (..., Fq*T, d)
    for the frames ``query_frames``; ``k_local``/``v_local`` (..., Fk*T, d) for the frames
    ``key_frames`` (must contain every query's window, clipped to the video of ``total_frames``
    frames); ``k_global``/``v_global`` (..., G*T, d). Returns (..., Fq*T, dv). ``token_num_scale``
    counts key tokens. A band window over several query frames of many tokens needs a
    (chunk x span tokens) mask: DiT callers pass ``chunk_size=1`` there (one query frame sees its
    whole key span and needs no mask).

    ``split_invariant``: a query's arithmetic depends only on its global frame index and the
    settings, never on which other frames share the call: queries are grouped in blocks of
    ``chunk_size`` frames aligned to the video (block b holds frames b*chunk_size.. ), and each block
    runs as one fused attention call whose shapes are fixed by the block alone -- the block's rows
    this call does not own are zeros, its key span's frames this call does not hold are zeros (they
    lie outside the owned queries' windows, so their softmax weight is exactly 0). Kernels pick
    their algorithm by shape, and a row's result does not depend on other rows' values, so the
    video is bit-identical however it is split over ranks. Otherwise fused attention over chunks of
    the call's own queries (the same up to rounding).
    """
    tokens = tokens_per_frame
    if len(query_frames) * tokens != q.shape[-2] or len(key_frames) * tokens != k_local.shape[-2]:
        raise ValueError("query_frames/key_frames (times tokens_per_frame) do not match the tensors' token counts")
    left, right = attention_reach(padding, total_frames, loop)
    padding = max(left, right)
    if left != right or (loop and split_invariant):
        # One query per block. A ring with fewer frames than the window: the kernels mask a
        # symmetric window within the block's key span, so the span is then exactly its asymmetric
        # window. A split-invariant ring: blocks aligned to frame 0 would give frame g and frame g+k
        # other positions in their blocks, breaking exact roll-equivariance (a ring has no frame 0).
        chunk_size = 1
    settings = dict(padding=padding, scale=scale, local_bias=local_bias, global_bias=global_bias,
                    token_num_scale=token_num_scale, tokens=tokens)
    video = range(total_frames)
    outputs = []
    if split_invariant:
        blocks = [intersect(range(b * chunk_size, (b + 1) * chunk_size), video)
                  for b in range(query_frames.start // chunk_size, (query_frames.stop - 1) // chunk_size + 1)]
    else:
        blocks = [query_frames[c0 : c0 + chunk_size] for c0 in range(0, len(query_frames), chunk_size)]
    num_global = k_global.shape[-2]
    for rows in blocks:
        span = window(rows, left, right, total_frames, loop)
        owned = intersect(rows, query_frames)
        needed = window(owned, left, right, total_frames, loop)
        if not (key_frames.start <= needed.start and needed.stop <= key_frames.stop):
            raise ValueError(f"key_frames {key_frames} lack frames of the windows of queries {owned}")
        if split_invariant:  # fresh contiguous tensors: shapes and layout fixed by the block
            block_q = _zero_filled(q, query_frames, rows, tokens)
            block_k = _zero_filled(k_local, key_frames, span, tokens, then=k_global)
            block_v = _zero_filled(v_local, key_frames, span, tokens, then=v_global)
        else:
            k0 = (span.start - key_frames.start) * tokens
            q0 = (owned.start - query_frames.start) * tokens
            block_q = q[..., q0 : q0 + len(owned) * tokens, :]
            block_k, block_v = (t[..., k0 : k0 + len(span) * tokens, :] for t in (k_local, v_local))
            if num_global:
                block_k, block_v = torch.cat([block_k, k_global], dim=-2), torch.cat([block_v, v_global], dim=-2)
        out = _fused_attention(block_q, block_k, block_v, num_global, chunk=rows, span=span, **settings)
        outputs.append(out[..., (owned.start - rows.start) * tokens : (owned.stop - rows.start) * tokens, :])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def _zero_filled(t: torch.Tensor, frames: range, wanted: range, tokens: int = 1,
                 then: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (..., len(frames)*tokens, d) holds ``frames``: a contiguous (..., len(wanted)*tokens, d)
    tensor for ``wanted``, with the frames of ``wanted`` that ``t`` lacks as zeros; followed along
    the token axis by ``then`` (..., n, d) if given (the global keys: one copy, no concatenation)."""
    size = len(wanted) * tokens
    out = t.new_empty(*t.shape[:-2], size + (then.shape[-2] if then is not None else 0), t.shape[-1])
    if then is not None:
        out[..., size:, :] = then
    held = intersect(wanted, frames)
    if not len(held):
        out[..., :size, :].zero_()
        return out
    dst, src = (held.start - wanted.start) * tokens, (held.start - frames.start) * tokens
    end = dst + len(held) * tokens
    out[..., dst:end, :] = t[..., src : src + len(held) * tokens, :]
    out[..., :dst, :].zero_()  # only the frames not held
    out[..., end:size, :].zero_()
    return out


def _fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_global: int, *, chunk: range,
                     span: range, padding: int, scale: float, local_bias: float, global_bias: float,
                     token_num_scale: bool, tokens: int = 1) -> torch.Tensor:
    """One chunk with one fused attention call over the chunk's key span, masked to each query's window.

    ``keys``/``values``: the span's tokens followed by ``num_global`` global tokens.
    """
    num_local = len(span) * tokens
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
    attn: Attention, context: torch.Tensor, context_frames: range, global_states: torch.Tensor, global_frames: list[int],
    total_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of the local window, and of the global frames (in ``global_frames`` order).

    A global frame inside the window (on one process: all of them) takes its rows of the window's
    projection; only the others are projected, so no frame goes through ``to_k``/``to_v`` twice.
    ``total_frames``: the video's length when ``context_frames`` may be an unwrapped loop window.
    """
    key, value = attn.to_k(context), attn.to_v(context)
    if not global_frames:
        return key, value, key[:, :0], value[:, :0]
    total = total_frames if total_frames is not None else max(context_frames.stop, max(global_frames) + 1)
    offsets = [ring_offset(context_frames, frame, total) for frame in global_frames]
    inside = [i for i, offset in enumerate(offsets) if offset is not None]
    outside = [i for i, offset in enumerate(offsets) if offset is None]
    device = context.device
    rows = torch.tensor([offsets[i] for i in inside], dtype=torch.long, device=device)
    global_key, global_value = key.index_select(1, rows), value.index_select(1, rows)
    if outside:
        remote = global_states.index_select(1, torch.tensor(outside, dtype=torch.long, device=device))
        global_key = torch.cat([global_key, attn.to_k(remote)], dim=1)
        global_value = torch.cat([global_value, attn.to_v(remote)], dim=1)
        # Back to the order of ``global_frames`` (every rank sums the global keys in the same order).
        restore = torch.tensor(sorted(range(len(global_frames)), key=(inside + outside).__getitem__), device=device)
        global_key, global_value = global_key.index_select(1, restore), global_value.index_select(1, restore)
    return key, value, global_key, global_value


@dataclass(frozen=True)
class TemporalCall:
    """What one temporal-attention call attends, fixed by the whole video and the step (never by the
    rank's clip), so every rank computes the same for a frame."""

    layout: FrameLayout
    timestep: float
    left: int
    """Frames before its own that a query's window reaches (the halo each rank fetches: the widest need)."""
    right: int
    global_frames: list[int]
    local_bias: float
    global_bias: float
    split_invariant: bool
    loop: bool


class TemporalAttnProcessor:
    """The skeleton of every family's temporal (or DiT self-) attention processor over one clip:

    1. a self-attention call only (no encoder states, no mask);
    2. the call's :class:`TemporalCall`: its layout and timestep (the handle's ``DenoiseState``), the
       window's reach (:meth:`reach`), the global frames (``top_k``, rotating with the step's index
       if asked) and phase biases of the step;
    3. what neighbours need (:meth:`exchanged`: the hidden states, or a DiT's keys and values as they
       enter attention) leaves point-to-point, with the global frames from their owners;
    4. meanwhile :meth:`before_wait` (the queries: computing while frames travel);
    5. :meth:`attend` on the clip plus halo and the global frames: the family's math (dual-scope
       attention, motion windows, rotary positions), then :meth:`output` (projection, residual).

    A family specialises 3-5 (and :meth:`reach`); the communication and the per-step settings are
    this class's alone.
    """

    kind = "dual-scope attention"
    loops = True
    """Whether the processor applies ``EngineConfig.loop`` (its windows wrap around the ring)."""

    def __init__(self, config: EngineConfig, ctx: ClipContext, state: DenoiseState) -> None:
        self.engine_config, self.config = config, config.attn
        self.ctx, self.state = ctx, state

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError(f"{self.kind} handles self-attention only (no encoder states, no mask)")
        self.check(attn, hidden_states)
        call = self.temporal_call(hidden_states.device.type)
        sent, frame_dim, carry = self.exchanged(attn, hidden_states, call, **kwargs)
        pending = self.start(sent, frame_dim, call)
        early = self.before_wait(attn, hidden_states, call, carry, **kwargs)
        context, context_frames, global_states = pending.wait()
        return self.attend(attn, hidden_states, early, context, context_frames, global_states, call, **kwargs)

    def temporal_call(self, device_type: str) -> TemporalCall:
        """The settings of the call in progress (its layout and timestep are the handle's state)."""
        layout, timestep = self.state.layout, self.state.timestep
        left, right = self.reach(layout)
        local_bias, global_bias = self.config.phase_biases(timestep)
        # Rotating global frames move one frame per denoising step (the step the sampling loop gave
        # every rank alike), so that every frame serves as an anchor over the run.
        shift = self.state.step if self.config.global_frames == "rotating" else 0
        return TemporalCall(
            layout=layout, timestep=timestep, left=left, right=right,
            global_frames=global_frame_indices(layout.total_frames, self.config.global_frame_count(timestep), shift),
            local_bias=local_bias, global_bias=global_bias,
            split_invariant=self.engine_config.split_invariant_on(device_type),
            loop=self.engine_config.loop and self.loops,
        )

    def start(self, sent: torch.Tensor, frame_dim: int, call: TemporalCall,
              out: torch.Tensor | None = None) -> PendingFrames:
        """Send what neighbours need of ``sent`` (the owned frames along ``frame_dim``) and fetch theirs
        (into ``out``, the window's tensor of which ``sent`` is a part, when given)."""
        return start_exchange(sent, frame_dim, call.layout, call.left, call.right, self.ctx, call.global_frames,
                              kind="attn_halo", loop=call.loop, out=out)

    def window(self, call: TemporalCall) -> range:
        """The frames (unwrapped in a loop) the call's window holds: the owned ones and their halo."""
        return window(call.layout.owned, call.left, call.right, call.layout.total_frames, call.loop)

    # ---- what a family specialises
    def check(self, attn: Attention, hidden_states: torch.Tensor) -> None:
        """Refuse inputs the processor does not handle (before anything is sent): by default a UNet's
        temporal attention, (batch, frames, channels) without norms."""
        if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None \
                or hidden_states.dim() != 3:
            raise NotImplementedError(f"{self.kind} expects (batch, frames, channels) inputs without norms")

    def reach(self, layout: FrameLayout) -> tuple[int, int]:
        """(left, right) frames of halo: the band of ``padding`` frames (around the ring in a loop)."""
        return attention_reach(self.config.padding, layout.total_frames, self.engine_config.loop and self.loops)

    def exchanged(self, attn: Attention, hidden_states: torch.Tensor, call: TemporalCall,
                  **kwargs) -> tuple[torch.Tensor, int, object]:
        """(tensor whose frames neighbours need, its frame dimension, anything computed on the way
        for :meth:`before_wait`): the hidden states by default."""
        return hidden_states, 1, None

    def before_wait(self, attn: Attention, hidden_states: torch.Tensor, call: TemporalCall, carry: object,
                    **kwargs) -> object:
        """Work done while the frames travel (the queries), handed to :meth:`attend`."""
        return None

    def attend(self, attn: Attention, hidden_states: torch.Tensor, early: object, context: torch.Tensor,
               context_frames: range, global_states: torch.Tensor, call: TemporalCall, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def output(attn: Attention, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The attention module's output projection (and dropout), residual and rescaling, as diffusers'."""
        out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "residual_connection", False):
            out = out + residual
        factor = getattr(attn, "rescale_output_factor", 1.0)
        return out if factor == 1.0 else out / factor


class DualScopeAttnProcessor(TemporalAttnProcessor):
    """Attention processor for temporal self-attention (sequence axis = frames) over a clip of the video."""

    def before_wait(self, attn: Attention, hidden_states: torch.Tensor, call: TemporalCall, carry: object,
                    **kwargs) -> torch.Tensor:
        return attn.to_q(hidden_states)

    def attend(self, attn: Attention, hidden_states: torch.Tensor, early: object, context: torch.Tensor,
               context_frames: range, global_states: torch.Tensor, call: TemporalCall, **kwargs) -> torch.Tensor:
        config, layout = self.config, call.layout
        key, value, global_key, global_value = _project_keys_values(
            attn, context, context_frames, global_states, call.global_frames, layout.total_frames
        )
        batch = hidden_states.shape[0]
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(early), heads(key), heads(value)
        global_key, global_value = heads(global_key), heads(global_value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key, global_key = attn.norm_k(key), attn.norm_k(global_key)
        out = dual_scope_attention(
            query,
            key,
            value,
            global_key,
            global_value,
            query_frames=layout.owned,
            key_frames=context_frames,
            total_frames=layout.total_frames,
            padding=config.padding,
            scale=attn.scale * config.attn_scale,
            local_bias=call.local_bias,
            global_bias=call.global_bias,
            token_num_scale=config.token_num_scale,
            chunk_size=config.query_chunk(call.split_invariant),
            split_invariant=call.split_invariant,
            loop=call.loop,
        )
        if call.split_invariant:
            # Heads merged frames-first, returned as a (batch, frames, C) view: ``to_out``'s
            # per-frame products (``per_frame.PerFrameLinear`` on ``FramesAxis``) then take each frame's rows as they are.
            out = out.permute(2, 0, 1, 3).reshape(out.shape[2], batch, -1).transpose(0, 1).to(query.dtype)
        else:
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return self.output(attn, out, hidden_states)
