"""The clip-parallel engine on AnimateDiff: diffusers' ``UNetMotionModel`` (an SD UNet + a motion adapter).

What owns the time axis there: the motion modules (``AnimateDiffTransformer3D``), each a GroupNorm over
(channels, frames, height, width), then transformer blocks whose two self-attentions run over frames
after a sinusoidal position embedding is added. So:

* the motion modules' GroupNorm gets whole-video statistics (as in the UNet3D family);
* their temporal attentions become windowed attention with window-relative positions
  (:mod:`.windows`): each block of ``query_block_frames`` query frames attends
  a ``window_frames``-frame window around it, plus global frames, with phase biases; the frames a
  rank lacks come from its neighbours (halo exchange) and the global frames' owners;
* the blocks' position embedding becomes the identity: positions are added inside the attention,
  relative to each window (never an index past the trained clip length);
* the UNet takes one text embedding per frame natively (``(batch*frames, seq, dim)``); the engine
  also accepts ``(batch, frames, seq, dim)`` and ``(batch, seq, dim)`` (repeated over frames);
* when computing split-invariantly, every op's shape is fixed by the frame (or, in the windowed
  attention, by the video's query block), never by the rank's clip (:mod:`video_infinity.engine.per_frame`,
  as in the UNet3D family): the SD spatial blocks and the layers outside them one frame per call,
  the motion modules' GroupNorm written frames-first, their linear layers one product per frame,
  each feed-forward one call per frame, LayerNorms row-local over the clip, and the attention one
  query block per call.

Everything is attached through diffusers' extension points (``ModelHook``s and attention processors)
on modules chosen by type, and ``handle.remove()`` restores the model.
"""

from __future__ import annotations

import logging

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import BasicTransformerBlock, FreeNoiseTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import nn

from ...config import EngineConfig, rotary_clip_refusal
from ...context import ClipContext, DenoiseState, FrameLayout
from ...engine.attention import TemporalAttnProcessor, TemporalCall
from ...engine.common import (
    PointwiseConvAsMatmul,
    TrackDenoiseStep,
    VideoGroupNorm,
    hook_spatial_per_frame,
    hook_temporal_rows,
    is_pointwise_conv,
)
from ...engine.handle import ParallelHandle
from .windows import MotionWindows, window_attention


logger = logging.getLogger(__name__)

__all__ = ["WindowedMotionAttnProcessor", "accepts", "parallelize"]


def accepts(model: nn.Module) -> bool:
    """Whether ``model`` is an AnimateDiff UNet (diffusers ``UNetMotionModel``)."""
    # Imported here: diffusers' unets package loads every UNet (seconds), which the engine's importers
    # (the CLI's early error paths included) should not pay for.
    from diffusers.models.unets.unet_motion_model import UNetMotionModel

    return isinstance(model, UNetMotionModel)


class _TrackMotionDenoiseStep(TrackDenoiseStep):
    """On the UNet: the UNet3D bookkeeping (layout, timestep), with text in the motion UNet's layout.

    ``UNetMotionModel`` expects one embedding per frame, ``(batch*frames, seq, dim)`` batch-major, and
    gives each frame's cross-attention its own: per-frame prompts need no processor swap here.
    """

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        batch, frames = sample.shape[0], sample.shape[2]
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if text is not None:
            if text.dim() == 4:
                if tuple(text.shape[:2]) != (batch, frames):
                    raise ValueError(
                        f"encoder_hidden_states: per-frame embeddings cover (batch, frames) = {tuple(text.shape[:2])}, "
                        f"the sample has ({batch}, {frames})"
                    )
                text = text.flatten(0, 1)
            elif text.shape[0] == batch and frames > 1:
                text = text.repeat_interleave(frames, dim=0)
            elif text.shape[0] != batch * frames:
                raise ValueError(
                    f"encoder_hidden_states has {text.shape[0]} rows; give (batch, seq, dim), "
                    f"(batch, frames, seq, dim) or (batch*frames, seq, dim) for batch {batch} and {frames} frames"
                )
            if len(args) > 2:
                args = (*args[:2], text, *args[3:])
            else:
                kwargs = {**kwargs, "encoder_hidden_states": text}
        return super().pre_forward(module, *args, **kwargs)


class _PositionsInsideAttention(ModelHook):
    """On a motion block's sinusoidal position embedding: the identity. The block's attention
    processors add window-relative positions themselves (a global index could exceed the table)."""

    def new_forward(self, module: SinusoidalPositionalEmbedding, x: torch.Tensor) -> torch.Tensor:
        return x


def _position_rows(projection: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """``projection(x + p) - projection(x)`` for each row p of ``positions``: what a position adds
    to an affine projection's output (``W p`` for a Linear)."""
    if type(projection) is nn.Linear:
        return torch.nn.functional.linear(positions, projection.weight)
    return projection(positions) - projection(torch.zeros_like(positions))


class WindowedMotionAttnProcessor(TemporalAttnProcessor):
    """Attention processor for a motion module's temporal self-attention over this rank's clip.

    Input (batch*height*width, frames, channels): this rank's frames, normalised, positions not yet
    added. See :mod:`.windows` for what each query attends. The halo is what the rank's query blocks'
    windows reach; queries are projected for whole blocks (frames of a neighbour's clip included)
    once the halo has arrived. Motion windows do not loop (``EngineConfig.loop`` is not applied).
    """

    kind = "motion attention"
    loops = False

    def __init__(self, config: EngineConfig, ctx: ClipContext, state: DenoiseState,
                 pos_embed: SinusoidalPositionalEmbedding | None) -> None:
        super().__init__(config, ctx, state)
        self.motion, self.pos_embed = config.motion, pos_embed

    def _windows(self, total: int) -> MotionWindows:
        return MotionWindows.for_video(total, self.motion.window_frames, self.motion.query_block_frames)

    def reach(self, layout: FrameLayout) -> tuple[int, int]:
        return self._windows(layout.total_frames).halo(layout.partition)

    def attend(self, attn: Attention, hidden_states: torch.Tensor, early: object, context: torch.Tensor,
               span: range, global_states: torch.Tensor, call: TemporalCall, **kwargs) -> torch.Tensor:
        layout, global_frames = call.layout, call.global_frames
        windows = self._windows(layout.total_frames)
        blocks = windows.blocks_overlapping(layout.owned)
        queried = range(windows.block(blocks[0]).start, windows.block(blocks[-1]).stop)  # whole blocks
        query = attn.to_q(context[:, queried.start - span.start : queried.stop - span.start])
        key, value = attn.to_k(context), attn.to_v(context)
        global_key, global_value = self._global_keys_values(attn, key, value, span, global_states, global_frames)
        positions = self._position_table(windows.window_frames, hidden_states)
        offsets = [None, None, None] if positions is None else [
            _position_rows(p, positions) for p in (attn.to_q, attn.to_k, attn.to_v)]

        exact = call.split_invariant
        options = dict(scale=attn.scale * self.config.attn_scale, local_bias=call.local_bias,
                       global_bias=call.global_bias, token_num_scale=self.config.token_num_scale, split_invariant=exact)
        heads = _Heads(attn, hidden_states.shape[0])
        # Split-invariant: one window block per call, whatever the clip holds besides (its rows then do
        # not depend on the split); fused: as many blocks as the query chunk holds.
        per_block = 1 if exact else max(1, self.config.query_chunk(False) // windows.block_frames)
        outputs = []
        for first in range(blocks.start, blocks.stop, per_block):
            group = range(first, min(first + per_block, blocks.stop))
            # Blocks of one call share a shape: the (possibly shorter) last block of the video goes alone.
            if len(group) > 1 and len(windows.block(group[-1])) != windows.block_frames:
                outputs.append(self._blocks(windows, range(first, group.stop - 1), queried, span, query, key, value,
                                            global_key, global_value, global_frames, offsets, heads, options, attn))
                group = range(group.stop - 1, group.stop)
            outputs.append(self._blocks(windows, group, queried, span, query, key, value, global_key, global_value,
                                        global_frames, offsets, heads, options, attn))
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        out = out[:, layout.owned.start - queried.start : layout.owned.stop - queried.start]
        return self.output(attn, out.to(query.dtype), hidden_states)

    def _position_table(self, window_frames: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        table = self.pos_embed.pe[0]
        if window_frames > table.shape[0]:
            raise ValueError(
                f"window_frames ({window_frames}) exceeds the motion modules' position table ({table.shape[0]}): "
                f"set it to at most {table.shape[0]} (the clip length the adapter was trained on)"
            )
        return table[:window_frames].to(like.dtype)

    @staticmethod
    def _global_keys_values(attn: Attention, key: torch.Tensor, value: torch.Tensor, span: range,
                            global_states: torch.Tensor, global_frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (positions not added) of the global frames: rows of the window's projection
        where the window holds the frame, a projection of the received states otherwise."""
        if not global_frames:
            return key[:, :0], value[:, :0]
        keys, values = [], []
        outside = [i for i, frame in enumerate(global_frames) if frame not in span]
        projected = {}
        if outside:
            remote = global_states[:, outside]
            remote_key, remote_value = attn.to_k(remote), attn.to_v(remote)
            projected = {i: j for j, i in enumerate(outside)}
        for i, frame in enumerate(global_frames):
            if i in projected:
                keys.append(remote_key[:, projected[i] : projected[i] + 1])
                values.append(remote_value[:, projected[i] : projected[i] + 1])
            else:
                keys.append(key[:, frame - span.start : frame - span.start + 1])
                values.append(value[:, frame - span.start : frame - span.start + 1])
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def _blocks(self, windows: MotionWindows, group: range, queried: range, span: range, query: torch.Tensor,
                key: torch.Tensor, value: torch.Tensor, global_key: torch.Tensor, global_value: torch.Tensor,
                global_frames: list[int], offsets: list, heads: "_Heads", options: dict, attn: Attention) -> torch.Tensor:
        """Attention output (batch, frames of the blocks ``group``, inner) for blocks of equal length."""
        q_offset, k_offset, v_offset = offsets
        qs, ks, vs, gks, gvs, visible = [], [], [], [], [], []
        for index in group:
            block, win = windows.block(index), windows.window(index)
            q = query[:, block.start - queried.start : block.stop - queried.start]
            k = key[:, win.start - span.start : win.stop - span.start]
            v = value[:, win.start - span.start : win.stop - span.start]
            gk, gv = global_key, global_value
            if q_offset is not None:
                q = q + q_offset[block.start - win.start : block.stop - win.start]
                k, v = k + k_offset, v + v_offset
                if global_frames:
                    rows = torch.tensor([windows.global_position(f, win) for f in global_frames], device=q.device)
                    gk, gv = gk + k_offset[rows], gv + v_offset[rows]
            for parts, part in ((qs, q), (ks, k), (vs, v), (gks, gk), (gvs, gv)):
                parts.append(part)
            visible.append(torch.tensor([f not in win for f in global_frames], dtype=torch.bool, device=q.device))
        stack = (lambda t: t[0].unsqueeze(1)) if len(group) == 1 else (lambda t: torch.stack(t, dim=1))
        # (batch, blocks, heads, frames, head_dim); global visibility (blocks, 1, G) broadcast over heads
        q, k, v, gk, gv = (heads.split(stack(t)) for t in (qs, ks, vs, gks, gvs))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k, gk = attn.norm_k(k), attn.norm_k(gk)
        out = window_attention(q, k, v, gk, gv, global_visible=torch.stack(visible)[:, None], **options)
        return heads.merge(out)


class _Heads:
    """(batch, blocks, frames, heads*d) <-> (batch, blocks, heads, frames, d)."""

    def __init__(self, attn: Attention, batch: int) -> None:
        self.heads, self.batch = attn.heads, batch

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, f, inner = t.shape
        return t.reshape(b, n, f, self.heads, inner // self.heads).transpose(2, 3)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        b, n, h, f, d = t.shape
        return t.transpose(2, 3).reshape(b, n * f, h * d)


def parallelize(unet: nn.Module, config: EngineConfig, context: ClipContext) -> ParallelHandle:
    """Hooks and processors for an AnimateDiff ``UNetMotionModel`` (see :func:`video_infinity.parallelize`).

    ``config.attn`` gives the global frames (``top_k``), phase biases, ``token_num_scale``,
    ``attn_scale`` and ``query_chunk_size``; its ``padding`` does not apply (the local window is
    ``config.motion.window_frames``). ``config.norm_scope`` and ``split_invariant`` apply as for UNet3D.
    """
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    motion = config.motion
    if not accepts(unet):
        raise TypeError(f"{type(unet).__name__} is not a UNetMotionModel")
    if config.attn.rotary_clip is not None:
        raise ValueError(rotary_clip_refusal("animatediff"))
    if any(isinstance(m, FreeNoiseTransformerBlock) for m in unet.modules()):
        raise ValueError("the UNet has FreeNoise blocks: call pipe.disable_free_noise() before parallelize()")
    motion_modules = [m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
    if not motion_modules:
        raise TypeError(f"{type(unet).__name__} has no motion modules (AnimateDiffTransformer3D)")
    for module in motion_modules:
        for block in module.transformer_blocks:
            table = getattr(block.pos_embed, "pe", None)
            if table is not None and motion.window_frames > table.shape[1]:
                raise ValueError(
                    f"motion.window_frames ({motion.window_frames}) exceeds the motion modules' position table "
                    f"({table.shape[1]}): set it to at most {table.shape[1]}"
                )
    state = DenoiseState()
    handle = ParallelHandle(unet, config, context, state)
    handle.hook(unet, _TrackMotionDenoiseStep(context, state))
    for module in unet.modules():
        if is_pointwise_conv(module):
            handle.hook(module, PointwiseConvAsMatmul(config))
    attentions = 0
    for module in motion_modules:
        # (batch, C, frames, H, W) stored as (frames, batch, H, W, C): the module's
        # permute(0, 3, 4, 2, 1).reshape(batch * H * W, frames, C) is then a frames-first view.
        handle.hook(module.norm, VideoGroupNorm(config, context, split_invariant_memory_order=(2, 0, 3, 4, 1)))
        hook_temporal_rows(module, handle)
        for block in module.transformer_blocks:
            if not isinstance(block, BasicTransformerBlock):
                raise TypeError(f"unsupported motion transformer block {type(block).__name__}")
            if block.pos_embed is not None:
                if not isinstance(block.pos_embed, SinusoidalPositionalEmbedding):
                    raise TypeError(f"unsupported motion position embedding {type(block.pos_embed).__name__}")
                handle.hook(block.pos_embed, _PositionsInsideAttention())
            for attn in (block.attn1, block.attn2):
                if isinstance(attn, Attention):
                    handle.set_processor(attn, WindowedMotionAttnProcessor(config, context, state, block.pos_embed))
                    attentions += 1
    hook_spatial_per_frame(unet, handle, {m for module in motion_modules for m in module.modules()})
    logger.debug("parallelized %d motion modules, %d temporal attentions", len(motion_modules), attentions)
    return handle
