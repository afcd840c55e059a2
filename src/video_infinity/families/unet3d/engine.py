"""The clip-parallel engine on diffusers' UNet3D family (ModelScope, ZeroScope, VideoCrafter2).

Behaviour is attached only through diffusers' own extension points: ``ModelHook``s (registered in
each module's ``HookRegistry``) on the modules that own the temporal axis, and attention processors
on the temporal attention modules. Modules are chosen by type, never by name.
"""

from __future__ import annotations

import logging
import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from torch import nn

from ...config import EngineConfig, rotary_clip_refusal
from ...context import ClipContext, DenoiseState
from ...engine.attention import DualScopeAttnProcessor
from ...engine.comm import start_exchange
from ...engine.common import (
    PointwiseConvAsMatmul,
    TrackDenoiseStep,
    VideoGroupNorm,
    hook_spatial_per_frame,
    hook_temporal_rows,
    is_pointwise_conv,
)
from ...engine.frame_conv import frame_conv, is_frame_conv
from ...engine.handle import ParallelHandle
from ...engine.norm import apply_group_norm, video_group_norm, video_group_statistics

logger = logging.getLogger(__name__)

class _ClipParallelTemporalConv(ModelHook):
    """On ``TemporalConvLayer``: run its convolutions over the clip plus halo frames from neighbours.

    Its stacked kernel-3 convolutions each widen the receptive field by one frame per side, so a
    halo of (number of convolutions) frames makes every owned output exact. Frames outside the video
    are not fetched, so the module's own zero padding applies at the true ends; in a loop the halo
    comes across the wrap (circular padding in time), so there are no ends.
    """

    def __init__(self, config: EngineConfig, ctx: ClipContext, state: DenoiseState, module: TemporalConvLayer) -> None:
        super().__init__()
        self.config, self.ctx, self.state = config, ctx, state
        # (GroupNorm, [(layer, whether frame_conv can compute it)]) for conv1..conv4
        self.blocks: list[tuple[nn.GroupNorm, list[tuple[nn.Module, bool]]]] = []
        reach = 0
        for block in (module.conv1, module.conv2, module.conv3, module.conv4):
            if not isinstance(block, nn.Sequential) or not isinstance(block[0], nn.GroupNorm):
                raise TypeError("unsupported TemporalConvLayer: each convN must be a Sequential starting with GroupNorm")
            self.blocks.append((block[0], [(layer, is_frame_conv(layer)) for layer in list(block)[1:]]))
            convs = [m for m in block if isinstance(m, nn.Conv3d)]
            reach += sum((c.kernel_size[0] - 1) // 2 * c.dilation[0] for c in convs)
        self.halo = reach if config.conv_layer.enabled else 0

    def new_forward(self, module: TemporalConvLayer, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        # Same layout handling as TemporalConvLayer.forward: (batch*frames, C, H, W) -> (batch, C, frames, H, W).
        x = hidden_states[None, :].reshape((-1, num_frames) + hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)
        layout = self.state.layout
        exact = self.config.split_invariant_on(x.device.type)
        scope = self.config.norm_scope
        pending = start_exchange(x, 2, layout, self.halo, self.halo, self.ctx, kind="conv_halo", loop=self.config.loop)
        if pending.span == layout.owned:  # nothing to fetch (one rank, or halos switched off)
            h, own = x, None
        else:
            # The first norm's statistics need only the owned frames: compute them while the halo travels.
            first_stats = video_group_statistics(x, self.blocks[0][0], self.ctx, scope, exact)
            h, span, _ = pending.wait()
            own = slice(layout.owned.start - span.start, layout.owned.stop - span.start)
        # Split-invariant: the first norm writes (frames, C, batch, H, W) memory, the layout in which
        # frame_conv reads its input (and writes its output), so no convolution copies its input.
        order = (2, 1, 0, 3, 4) if exact else None
        for index, (norm, layers) in enumerate(self.blocks):
            if index == 0 and own is not None:
                h = apply_group_norm(h, norm, *first_stats, memory_order=order)
            else:
                h = video_group_norm(h, norm, self.ctx, scope, owned=own, split_invariant=exact, memory_order=order)
            for layer, tap_by_tap in layers:
                h = frame_conv(h, layer) if exact and tap_by_tap else layer(h)
        # The residual sum written straight into the folded (batch * frames, C, H, W) output.
        batch, channels, frames = x.shape[:3]
        out = x.new_empty((batch * frames, channels) + x.shape[3:])
        folded = out.view((batch, frames, channels) + x.shape[3:]).transpose(1, 2)
        torch.add(x, h if own is None else h[:, :, own], out=folded)
        return out


class _GlobalFramePositions(ModelHook):
    """On a temporal block's sinusoidal position embedding: positions are global frame indices."""

    def __init__(self, state: DenoiseState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: SinusoidalPositionalEmbedding, x: torch.Tensor) -> torch.Tensor:
        layout = self.state.layout
        if layout.total_frames > module.pe.shape[1]:
            raise ValueError(
                f"the model's temporal position embedding covers {module.pe.shape[1]} frames, "
                f"the video has {layout.total_frames}"
            )
        return x + module.pe[:, layout.owned.start : layout.owned.stop]


class _PerFrameTextProcessor:
    """Wraps a cross-attention processor: uses each frame's own text embedding when one is given."""

    def __init__(self, inner: object, state: DenoiseState) -> None:
        self.inner, self.state = inner, state

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, *args, **kwargs):
        frame_text = self.state.frame_text
        if frame_text is not None and encoder_hidden_states is not None:
            if frame_text.shape[0] != hidden_states.shape[0]:
                raise ValueError("per-frame text embeddings do not match the cross-attention batch")
            encoder_hidden_states = frame_text.to(encoder_hidden_states.dtype)
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def accepts(model: nn.Module) -> bool:
    """Whether ``model`` has the UNet3D family's temporal modules (what this engine serves)."""
    return any(isinstance(m, (TemporalConvLayer, TransformerTemporalModel)) for m in model.modules())


def parallelize(unet: nn.Module, config: EngineConfig, context: ClipContext) -> ParallelHandle:
    """Hooks and processors for a UNet3D-family model (see :func:`video_infinity.parallelize`)."""
    if config.attn.rotary_clip is not None:
        raise ValueError(rotary_clip_refusal("unet3d"))
    temporal_convs = [m for m in unet.modules() if isinstance(m, TemporalConvLayer)]
    temporal_transformers = [m for m in unet.modules() if isinstance(m, TransformerTemporalModel)]
    if not temporal_convs and not temporal_transformers:
        raise TypeError(
            f"{type(unet).__name__} has no TemporalConvLayer or TransformerTemporalModel: "
            "video_infinity supports UNet3DConditionModel-family text-to-video UNets"
        )
    state = DenoiseState()
    handle = ParallelHandle(unet, config, context, state)
    hook = handle.hook

    hook(unet, TrackDenoiseStep(context, state))
    for conv in temporal_convs:
        hook(conv, _ClipParallelTemporalConv(config, context, state, conv))
    temporal_modules = {m for temporal in (*temporal_convs, *temporal_transformers) for m in temporal.modules()}
    for transformer in temporal_transformers:
        # (batch, C, frames, H, W) stored as (frames, batch, H, W, C): the transformer's
        # permute(0, 3, 4, 2, 1).reshape(batch * H * W, frames, C) is then a frames-first view.
        hook(transformer.norm, VideoGroupNorm(config, context, split_invariant_memory_order=(2, 0, 3, 4, 1)))
        for module in transformer.modules():
            if isinstance(module, Attention):
                handle.set_processor(module, DualScopeAttnProcessor(config, context, state))
            elif isinstance(module, SinusoidalPositionalEmbedding):
                hook(module, _GlobalFramePositions(state))
        hook_temporal_rows(transformer, handle)
    hook_spatial_per_frame(unet, handle, temporal_modules)
    for module in unet.modules():
        if is_pointwise_conv(module):
            hook(module, PointwiseConvAsMatmul(config))
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention and module not in temporal_modules:
            handle.set_processor(module, _PerFrameTextProcessor(module.processor, state))
    logger.debug(
        "parallelized %d temporal convolutions, %d temporal transformers, %d temporal attentions",
        len(temporal_convs),
        len(temporal_transformers),
        len(handle.processors),
    )
    return handle
