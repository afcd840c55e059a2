"""``parallelize(model, config, context)``: attach the clip-parallel engine to a video model.

The family registry (:func:`video_infinity.families.engine_for`) picks the family's engine plan by
the model's type; the plan attaches hooks and processors from the shared engine kit
(:mod:`video_infinity.engine`). ``handle.remove()`` takes everything off again.
"""

from __future__ import annotations

from torch import nn

from .config import EngineConfig
from .context import ClipContext
from .engine.handle import ParallelHandle, is_parallelized
from .families import engine_for

__all__ = ["ParallelHandle", "parallelize"]


def parallelize(
    model: nn.Module, config: EngineConfig | dict | None = None, context: ClipContext | None = None
) -> ParallelHandle:
    """Make ``model`` compute its slice of one long video with Video-Infinity's communication.

    ``context`` says which frames this process owns (latent frames for a DiT such as Wan); ``None``
    means one process owning all frames of each input. Returns a handle whose ``remove()`` restores
    the original model. TypeError for a model no family's engine accepts.
    """
    config = config if isinstance(config, EngineConfig) else EngineConfig.model_validate(config or {})
    context = context or ClipContext()
    if is_parallelized(model):
        raise ValueError("this model is already parallelized; call remove() on the existing handle first")
    return engine_for(model).parallelize(model, config, context)
