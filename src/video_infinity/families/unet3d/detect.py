"""Which folders are UNet3D text-to-video models (ModelScope, ZeroScope, VideoCrafter2): a
``TextToVideoSDPipeline`` folder, a pipeline folder whose ``unet`` is a ``UNet3DConditionModel``, or
a UNet-only folder (its ``config.json`` at the root; the other components come from ``base_model``).
Config files alone."""

from __future__ import annotations

from ..folder import FolderFacts, ModelFolder

SUMMARY = "UNet3D text-to-video (TextToVideoSDPipeline)"
PIPELINE_CLASSES = ("TextToVideoSDPipeline",)
UNET_CLASSES = ("UNet3DConditionModel",)
DENOISERS = ("UNet3DConditionModel",)
"""The denoiser classes its engine plan takes (for messages)."""
DIFFUSERS_NAMES = ("UNet3DConditionModel", "TextToVideoSDPipeline", "TemporalConvLayer", "TransformerTemporalModel",
                   "unet_3d_condition", "unet_3d_blocks", "transformer_temporal", "pipeline_text_to_video_synth")
"""diffusers classes and modules particular to this family: only the family's folder imports them
(``tests/test_architecture.py``)."""


def _is_unet_config(config: dict) -> bool:
    return "UNet" in str(config.get("_class_name", "")) or "down_block_types" in config


def facts(folder: ModelFolder, family: str = "unet3d", default_scheduler: str = "sde-dpmsolver++",
          supports_loop: bool = True) -> FolderFacts:
    """The shape rules of a Stable-Diffusion-style video UNet folder (UNet3D and AnimateDiff)."""
    unet = folder.config("unet") or folder.config()
    vae = folder.config("vae") or folder.config()
    return FolderFacts(
        family=family,
        components=("unet",),
        spatial_factor=2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1),
        latent_channels=int(unet.get("in_channels", 4)),
        default_scheduler=default_scheduler,
        model_scheduler=folder.scheduler_config(),
        supports_loop=supports_loop,
    )


def detect(folder: ModelFolder) -> FolderFacts | None:
    """Facts of a UNet3D folder, or None."""
    if folder.pipeline_class:
        if folder.pipeline_class in PIPELINE_CLASSES or folder.component_class("unet") in UNET_CLASSES:
            return facts(folder)
        return None
    if (folder.path / "unet").is_dir() or _is_unet_config(folder.config()):
        return facts(folder)  # a pipeline folder without model_index.json, or a UNet-only folder
    return None
