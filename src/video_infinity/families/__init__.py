"""Model families: what the pipeline needs to know about one kind of text-to-video model.

The pipeline (:mod:`video_infinity.pipeline`) runs one sampling loop for every family; a family
says how to load its components, encode prompts, shape and draw latents, call its model for one
denoising step (classifier-free guidance included) and decode a rank's latents. The engine
(:func:`video_infinity.parallelize`) attaches to each of ``family.denoisers``.

To add a family, implement :class:`ModelFamily` (``families/base.py``) in a module of its own and
list the class in ``FAMILIES`` below: ``load_family`` asks each class, in order, whether it can
load a folder (``can_load``), ``family_from_pipe`` whether it can take a diffusers pipeline
(``can_take``). Wan (recognised by its ``model_index.json``) comes first; AnimateDiff before UNet3D
(its UNet has temporal layers too); UNet3D is last: it is the fallback for folders.
"""

from __future__ import annotations

from typing import Any

import torch

from ..supported_models import SUPPORTED_MODELS, unsupported_model
from .animatediff import AnimateDiffFamily
from .base import Conditioning, ModelFamily
from .unet3d import UNet3DFamily
from .wan import WanFamily

FAMILIES: list[type[ModelFamily]] = [WanFamily, AnimateDiffFamily, UNet3DFamily]
"""Families tried in order; the first that accepts the model wins."""

__all__ = ["AnimateDiffFamily", "Conditioning", "FAMILIES", "ModelFamily", "UNet3DFamily", "WanFamily", "family_from_pipe",
           "load_family"]


def load_family(model: str, base_model: str | None, torch_dtype: torch.dtype, device: torch.device) -> ModelFamily:
    """Load ``model`` (a diffusers folder or hub id) with the first family that recognises it; a
    pipeline no family runs (e.g. image-to-video Wan) is refused from its config files first."""
    problem = unsupported_model(model)
    if problem is not None:
        raise ValueError(problem)
    for family in FAMILIES:
        if family.can_load(model):
            return family.load(model, base_model, torch_dtype, device)
    raise ValueError(f"model: {model!r} is not a model of a supported family ({', '.join(f.name for f in FAMILIES)})")


def family_from_pipe(pipeline: Any) -> ModelFamily:
    """Wrap an already loaded diffusers pipeline's components (no copy of the weights)."""
    for family in FAMILIES:
        if family.can_take(pipeline):
            return family.from_pipe(pipeline)
    raise ValueError(f"from_pipe: {type(pipeline).__name__} is not a supported text-to-video pipeline "
                     f"(supported: {SUPPORTED_MODELS})")
