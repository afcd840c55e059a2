"""Which folders are AnimateDiff: an ``AnimateDiffPipeline`` folder (or one whose UNet is a
``UNetMotionModel``), or a ``MotionAdapter`` folder (its Stable Diffusion 1.5 base comes as
``base_model``). Config files alone."""

from __future__ import annotations

from pathlib import Path

from ..folder import FolderFacts, ModelFolder, read_json
from ..unet3d.detect import facts

SUMMARY = "AnimateDiff (AnimateDiffPipeline, or a MotionAdapter on Stable Diffusion 1.5)"
DENOISERS = ("UNetMotionModel",)
"""The denoiser classes its engine plan takes (for messages)."""
DIFFUSERS_NAMES = ("UNetMotionModel", "MotionAdapter", "AnimateDiffPipeline", "AnimateDiffTransformer3D",
                   "FreeNoiseTransformerBlock", "unet_motion_model", "animatediff", "free_noise_utils")
"""diffusers classes and modules particular to this family: only the family's folder imports them."""


def is_animatediff_folder(model: str | Path) -> bool:
    """Whether ``model`` is a local AnimateDiff pipeline folder (its ``model_index.json`` or its UNet's
    config says so)."""
    folder = Path(model)
    if str(read_json(folder / "model_index.json").get("_class_name", "")).startswith("AnimateDiff"):
        return True
    return read_json(folder / "unet" / "config.json").get("_class_name") == "UNetMotionModel"


def is_motion_adapter_folder(model: str | Path) -> bool:
    """Whether ``model`` is a local diffusers ``MotionAdapter`` folder."""
    return read_json(Path(model) / "config.json").get("_class_name") == "MotionAdapter"


def detect(folder: ModelFolder) -> FolderFacts | None:
    """Facts of an AnimateDiff folder (a motion adapter's are its base's, known at load), or None."""
    if folder.pipeline_class.startswith("AnimateDiff") or folder.component_class("unet") == "UNetMotionModel" \
            or is_motion_adapter_folder(folder.path):
        # AnimateDiff's published pipelines sample with DDIM; its motion windows do not wrap around.
        return facts(folder, family="animatediff", default_scheduler="ddim", supports_loop=False)
    return None
