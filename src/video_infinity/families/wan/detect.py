"""Which folders are text-to-video Wan (``WanPipeline``: Wan2.1, Wan2.2 A14B, TI2V-5B used as
text-to-video), from config files alone. A Wan folder is judged by what it holds, not only by the
class it was saved with: a ``WanPipeline`` folder whose transformer takes image conditioning is
image-to-video, which is refused."""

from __future__ import annotations

from ..folder import FolderFacts, ModelFolder

SUMMARY = "text-to-video Wan (WanPipeline)"
PIPELINE_CLASSES = ("WanPipeline",)
"""``_class_name`` values of ``model_index.json`` of text-to-video Wan folders."""
DENOISERS = ("WanTransformer3DModel",)
"""The denoiser classes its engine plan takes (for messages)."""
DIFFUSERS_NAMES = ("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan", "WanAttention", "WanRotaryPosEmbed",
                   "WanTransformerBlock", "WanTimeTextImageEmbedding", "WanCausalConv3d", "WanResample",
                   "transformer_wan", "autoencoder_kl_wan", "pipeline_wan")
"""diffusers classes and modules particular to this family: only the family's folder imports them."""


def _image_conditioning(folder: ModelFolder) -> list[str]:
    """What in a Wan folder takes an image: an image encoder, a transformer with an image embedder
    (``image_dim``) or with more input than output channels (image latents concatenated, Wan2.2 I2V)."""
    found = [f"an {name} component" for name in ("image_encoder", "image_processor")
             if folder.component_class(name) is not None]
    for name in ("transformer", "transformer_2"):
        config = folder.config(name)
        if config.get("image_dim") is not None:
            found.append(f"{name} image_dim {config['image_dim']}")
        ins, outs = config.get("in_channels"), config.get("out_channels")
        if isinstance(ins, int) and isinstance(outs, int) and ins != outs:
            found.append(f"{name} in_channels {ins} != out_channels {outs}")
    return found


def detect(folder: ModelFolder) -> FolderFacts | str | None:
    """Facts of a text-to-video Wan folder; what it holds (a refusal) for another Wan pipeline; None if not Wan."""
    class_name = folder.pipeline_class
    if not class_name.startswith("Wan"):
        return None
    image = _image_conditioning(folder)
    if class_name not in PIPELINE_CLASSES or image:
        return f"image-to-video: {', '.join(image)}" if image else (
            "image-to-video" if "ImageToVideo" in class_name else "not text-to-video")
    vae, transformer = folder.config("vae"), folder.config("transformer")
    patch = transformer.get("patch_size") or [1, 1, 1]
    spatial = int(vae.get("scale_factor_spatial", 8))
    return FolderFacts(
        family="wan",
        components=tuple(name for name in ("transformer", "transformer_2") if folder.has_component(name)) or ("transformer",),
        temporal_compression=int(vae.get("scale_factor_temporal", 4)),
        spatial_multiple=spatial * int(patch[-1]),
        spatial_factor=spatial,
        latent_channels=int(transformer.get("out_channels") or transformer.get("in_channels") or 16),
        latent_element_bytes=4,  # the sampling loop carries float32 latents
        default_scheduler="model",  # the folder's flow-matching UniPC with its flow_shift
        model_scheduler=folder.scheduler_config(),
    )
