"""Engine hooks shared by the UNet families (UNet3D and AnimateDiff's UNetMotionModel).

The bookkeeping of a UNet call (frame layout, timestep, per-frame text), whole-video GroupNorm on a
temporal module's input, and, when computing split-invariantly, the per-frame hooks of
:mod:`.per_frame` on the spatial layers and on a temporal transformer's row-wise
layers, and 1x1 convolutions as matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..config import EngineConfig
from ..context import ClipContext, DenoiseState
from .handle import ParallelHandle
from .norm import video_group_norm
from .per_frame import FramesAxis, FramesFirstRowNorm, PerFrameCall, PerFrameLinear, PerFrameModule

__all__ = [
    "PointwiseConvAsMatmul", "SPATIAL_BLOCKS", "SPATIAL_LEAVES", "TrackCall", "TrackDenoiseStep", "VideoGroupNorm",
    "hook_spatial_per_frame", "hook_temporal_rows", "is_pointwise_conv", "scalar_timestep",
]

SPATIAL_BLOCKS = (ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D)
"""Modules that see a clip's frames as ``batch * frames`` images and never mix frames: computed one
frame per call when split-invariant (see :mod:`video_infinity.engine.per_frame`)."""
SPATIAL_LEAVES = (nn.Conv2d, nn.GroupNorm, nn.Linear, nn.LayerNorm)
"""Layers outside those blocks and the temporal modules (``conv_in``, ``conv_norm_out``,
``conv_out``, ...): also one frame per call when their input holds ``batch * frames`` images."""


def hook_spatial_per_frame(unet: nn.Module, handle: ParallelHandle, temporal_modules: set[nn.Module]) -> None:
    """One frame per call (when split-invariant) for the spatial blocks, and for the spatial layers
    outside any block, of the UNet: every module that folds frames into its batch."""
    inside_block: set[nn.Module] = set()
    for module in unet.modules():
        if module in temporal_modules or module in inside_block:
            continue
        if isinstance(module, SPATIAL_BLOCKS):
            inside_block.update(module.modules())
            handle.hook(module, PerFrameCall(handle.config, handle.state))
        elif isinstance(module, SPATIAL_LEAVES):
            handle.hook(module, PerFrameCall(handle.config, handle.state))


def hook_temporal_rows(transformer: nn.Module, handle: ParallelHandle) -> None:
    """Per-frame hooks (when split-invariant) on the row-wise layers of a temporal transformer, whose
    activations are (positions, frames, C): every ``Linear`` (projections in and out, the attentions'
    projections) one product per frame, each feed-forward one call per frame as a whole (its
    element-wise non-linearity rounds differently in vector body and scalar tail, and which elements
    fall in a tail depends on the tensor's size and thread split), LayerNorms frames-first."""
    in_feed_forward = {m for ff in transformer.modules() if isinstance(ff, FeedForward) for m in ff.modules()}
    rows = FramesAxis()
    for module in transformer.modules():
        if isinstance(module, FeedForward):
            handle.hook(module, PerFrameModule(handle.config, rows))
        elif isinstance(module, nn.Linear) and module not in in_feed_forward:
            handle.hook(module, PerFrameLinear(handle.config, rows))
        elif isinstance(module, nn.LayerNorm):
            handle.hook(module, FramesFirstRowNorm(handle.config))


class PointwiseConvAsMatmul(ModelHook):
    """On a 1x1 ``Conv2d`` (frames are its batch): a matrix product when computing split-invariantly.

    oneDNN picks its 1x1-convolution algorithm by batch size, so a frame rounds differently in a
    13-frame clip and in a 7-frame one; a matrix product over channels gives every frame the same
    arithmetic whatever the clip length. Otherwise the module's own convolution.
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config

    def new_forward(self, module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if not self.config.split_invariant_on(x.device.type):
            return F.conv2d(x, module.weight, module.bias)
        return F.linear(x.movedim(1, -1), module.weight[:, :, 0, 0], module.bias).movedim(-1, 1)


def is_pointwise_conv(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.groups == 1
    )


class TrackCall(ModelHook):
    """On a family's denoiser: record each call's frame layout, batch and timestep in the handle's
    ``DenoiseState``, which the hooks and processors of the same handle read (the denoiser's input
    is (batch, channels, frames, h, w), its first argument, named ``sample_name``)."""

    sample_name = "sample"

    def __init__(self, ctx: ClipContext, state: DenoiseState) -> None:
        super().__init__()
        self.ctx, self.state = ctx, state

    def record(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's sample and timestep, recorded."""
        sample = args[0] if args else kwargs[self.sample_name]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.layout = self.ctx.layout_for(sample.shape[2])
        self.state.batch = sample.shape[0]
        self.state.timestep = self.call_timestep(timestep)
        self._count_step()
        return sample, timestep

    def _count_step(self) -> None:
        """Without a step index from the sampling loop (``ParallelHandle.set_step``), count the steps:
        a call at another timestep than the previous one starts the next step (classifier-free
        guidance's two calls of a step share theirs); the timestep is the same on every rank."""
        state = self.state
        if state.step_given:
            return
        if state.counted_timestep is not None and state.timestep != state.counted_timestep:
            state.step += 1
        state.counted_timestep = state.timestep

    def call_timestep(self, timestep: torch.Tensor | float | int) -> float:
        """The call's one timestep (phase biases, global frames): by default the one the call gives."""
        return scalar_timestep(timestep)


class TrackDenoiseStep(TrackCall):
    """On a UNet: the call's layout and timestep, and per-frame text for the cross-attentions."""

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        sample, _ = self.record(args, kwargs)
        self.state.frame_text = None
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if text is not None and text.dim() == 4:
            # (batch, frames, seq, dim): one embedding per frame. The UNet itself repeats one
            # embedding per sample over frames, so hand it frame 0 and let the cross-attention
            # processors swap in each frame's own embedding (batch-major, as the UNet flattens).
            if text.shape[1] != sample.shape[2]:
                raise ValueError(f"per-frame text embeddings cover {text.shape[1]} frames, the sample has {sample.shape[2]}")
            self.state.frame_text = text.flatten(0, 1)
            args, kwargs = list(args), dict(kwargs)
            if len(args) > 2:
                args[2] = text[:, 0]
            else:
                kwargs["encoder_hidden_states"] = text[:, 0]
            args = tuple(args)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        self.state.frame_text = None  # do not keep the call's embeddings alive
        return output


META_TIMESTEP = 1000.0
"""The timestep a call on meta tensors (a memory plan, no values) is taken to have: the start of
denoising, where the most global frames are attended (``dynamic_attn_tokens``)."""


def scalar_timestep(timestep: torch.Tensor | float | int) -> float:
    if not torch.is_tensor(timestep):
        return float(timestep)
    if timestep.device.type == "meta":
        return META_TIMESTEP
    values = timestep.detach().flatten().float().cpu()
    if values.numel() > 1 and not torch.all(values == values[0]):
        raise ValueError("timestep: the engine needs one timestep per model call (phase biases); got different per-sample values")
    return float(values[0])


class VideoGroupNorm(ModelHook):
    """On a temporal transformer's input GroupNorm (input (batch, C, frames, H, W)): whole-video statistics.

    ``split_invariant_memory_order``: when computing split-invariantly, the output's memory order
    (see :func:`video_infinity.engine.norm.apply_group_norm`), chosen so that the transformer's reshape of
    it is a frames-first view and its per-frame layers need no copy.
    """

    def __init__(self, config: EngineConfig, ctx: ClipContext,
                 split_invariant_memory_order: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        self.memory_order = split_invariant_memory_order

    def new_forward(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        exact = self.config.split_invariant_on(x.device.type)
        return video_group_norm(x, module, self.ctx, self.config.norm_scope, split_invariant=exact,
                                memory_order=self.memory_order if exact else None)
