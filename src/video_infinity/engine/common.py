"""Engine hooks shared by the UNet families (UNet3D and AnimateDiff's UNetMotionModel).

The bookkeeping of a UNet call (frame layout, timestep, per-frame text), whole-video GroupNorm on a
temporal module's input, and 1x1 convolutions as matrix products when computing split-invariantly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from ..config import EngineConfig
from ..context import ClipContext, DenoiseState
from .norm import video_group_norm

__all__ = ["PointwiseConvAsMatmul", "TrackDenoiseStep", "VideoGroupNorm", "is_pointwise_conv", "scalar_timestep"]


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


class TrackDenoiseStep(ModelHook):
    """On the UNet: record this call's frame layout and timestep for the temporal hooks."""

    def __init__(self, ctx: ClipContext, state: DenoiseState) -> None:
        super().__init__()
        self.ctx, self.state = ctx, state

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.layout = self.ctx.layout_for(sample.shape[2])
        self.state.batch = sample.shape[0]
        self.state.timestep = scalar_timestep(timestep)
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


def scalar_timestep(timestep: torch.Tensor | float | int) -> float:
    if not torch.is_tensor(timestep):
        return float(timestep)
    values = timestep.detach().flatten().float().cpu()
    if values.numel() > 1 and not torch.all(values == values[0]):
        raise ValueError("timestep: the engine needs one timestep per model call (phase biases); got different per-sample values")
    return float(values[0])


class VideoGroupNorm(ModelHook):
    """On a temporal transformer's input GroupNorm (input (batch, C, frames, H, W)): whole-video statistics.

    ``split_invariant_memory_order``: when computing split-invariantly, the output's memory order
    (see :func:`video_infinity.norm.apply_group_norm`), chosen so that the transformer's reshape of
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
