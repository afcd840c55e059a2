"""The clip-parallel engine: ``parallelize(model, config, context)`` for each supported model family.

Each family has its own module (which modules own the time axis, how positions are given); the
model-agnostic core (context, frames, halo exchange, attention math, whole-video norms) lives
beside this package. ``parallelize`` picks the family by the model's type.
"""

from __future__ import annotations

from torch import nn

from ..config import EngineConfig
from ..context import ClipContext
from .handle import ParallelHandle, is_parallelized
from .motion import is_motion_family, parallelize_motion
from .unet3d import is_unet3d_family, parallelize_unet3d
from .wan import is_wan_transformer, parallelize_wan

__all__ = ["ParallelHandle", "parallelize"]


def parallelize(
    model: nn.Module, config: EngineConfig | dict | None = None, context: ClipContext | None = None
) -> ParallelHandle:
    """Make ``model`` compute its slice of one long video with Video-Infinity's communication.

    ``context`` says which frames this process owns (latent frames for a DiT such as Wan); ``None``
    means one process owning all frames of each input. Returns a handle whose ``remove()`` restores the original model.
    """
    config = config if isinstance(config, EngineConfig) else EngineConfig.model_validate(config or {})
    context = context or ClipContext()
    if is_parallelized(model):
        raise ValueError("this model is already parallelized; call remove() on the existing handle first")
    if is_motion_family(model):  # before the UNet3D check: a type test, not a module scan
        return parallelize_motion(model, config, context)
    if is_wan_transformer(model):
        return parallelize_wan(model, config, context)
    if is_unet3d_family(model):
        return parallelize_unet3d(model, config, context)
    raise TypeError(
        f"{type(model).__name__} is not a supported video model: video_infinity supports "
        "UNet3DConditionModel-family text-to-video UNets (TemporalConvLayer / TransformerTemporalModel), "
        "AnimateDiff's UNetMotionModel and diffusers' WanTransformer3DModel (Wan2.1 / Wan2.2)"
    )
