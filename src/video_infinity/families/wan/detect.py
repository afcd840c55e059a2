"""Which folders are Wan the engine runs, from config files alone: text-to-video (``WanPipeline``:
Wan2.1, Wan2.2 A14B, TI2V-5B) and image-to-video in the four modes of diffusers'
``WanImageToVideoPipeline`` (Wan2.1 I2V with CLIP, first-last-frame, Wan2.2 A14B I2V, Wan2.2 TI2V
with an image). VACE, Animate and speech-to-video are refused with one line."""

from __future__ import annotations

from ..folder import FolderFacts, ModelFolder

SUMMARY = "Wan text- and image-to-video (WanPipeline, WanImageToVideoPipeline)"
PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
"""``_class_name`` values of ``model_index.json`` of the Wan folders the engine runs."""
DENOISERS = ("WanTransformer3DModel",)
"""The denoiser classes its engine plan takes (for messages)."""
DIFFUSERS_NAMES = ("WanPipeline", "WanImageToVideoPipeline", "pipeline_wan_i2v", "WanTransformer3DModel", "AutoencoderKLWan", "WanAttention", "WanRotaryPosEmbed",
                   "WanTransformerBlock", "WanTimeTextImageEmbedding", "WanCausalConv3d", "WanResample",
                   "transformer_wan", "autoencoder_kl_wan", "pipeline_wan")
"""diffusers classes and modules particular to this family: only the family's folder imports them."""


REFUSED = {"WanVACEPipeline": "VACE (video editing and reference conditioning)",
           "WanAnimatePipeline": "Wan-Animate (character animation)",
           "WanSpeechToVideoPipeline": "speech-to-video", "WanVideoToVideoPipeline": "video-to-video"}
"""Wan pipelines whose conditioning the engine does not carry, refused with one line."""


def transformer_image_mode(in_channels: int, out_channels: int, expand_timesteps: bool, z_dim: int,
                           temporal: int) -> tuple[str | None, str]:
    """(how a transformer with these channels takes a start image: ``"concat"``, ``"first_frame"`` or
    None; what says so, or why it cannot run). A transformer with more input than output channels
    takes the image's mask and latents concatenated (Wan2.1 I2V, Wan2.2 A14B I2V); ``expand_timesteps``
    (Wan2.2 TI2V) puts the image's latents in place of the first latent frame. One rule for a folder's
    config files and a pipeline's loaded components."""
    if in_channels != out_channels:
        if in_channels != out_channels + temporal + z_dim:
            return None, (f"transformer in_channels {in_channels} is not out_channels {out_channels} + {temporal} mask "
                          f"channels + {z_dim} image latent channels")
        return "concat", f"transformer in_channels {in_channels} = noise {out_channels} + mask {temporal} + image latents {z_dim}"
    if expand_timesteps:
        return "first_frame", "expand_timesteps"
    return None, ""


def image_mode(folder: ModelFolder) -> tuple[str | None, str]:
    """:func:`transformer_image_mode` of a folder, judged by what it holds, not only by the class it
    was saved with."""
    config = folder.config("transformer") or folder.config("transformer_2")
    ins, outs = config.get("in_channels"), config.get("out_channels")
    vae = folder.config("vae")
    if not (isinstance(ins, int) and isinstance(outs, int)):
        ins = outs = 0
    return transformer_image_mode(ins, outs, bool(folder.index.get("expand_timesteps")), int(vae.get("z_dim", outs)),
                                  int(vae.get("scale_factor_temporal", 4)))


def clip_image_tokens(image_size: int, patch_size: int) -> int:
    """Tokens of one image's CLIP embeddings (Wan2.1 I2V): the patches and the class token."""
    return (int(image_size) // int(patch_size)) ** 2 + 1


NO_IMAGE = "image-to-video, but its transformer takes no image (in_channels = out_channels, no expand_timesteps)"
"""Why a ``WanImageToVideoPipeline`` whose transformer fits no image mode is refused (folder or object)."""


def detect(folder: ModelFolder) -> FolderFacts | str | None:
    """Facts of a Wan folder the engine runs (text-to-video; image-to-video in diffusers'
    ``WanImageToVideoPipeline`` modes); what it holds (a refusal) for another Wan pipeline; None if not Wan."""
    class_name = folder.pipeline_class
    if not class_name.startswith("Wan"):
        return None
    if class_name in REFUSED or class_name not in PIPELINE_CLASSES:
        return REFUSED.get(class_name, "not a WanPipeline or WanImageToVideoPipeline")
    mode, why = image_mode(folder)
    if mode is None and why:
        return why
    if class_name == "WanImageToVideoPipeline" and mode is None:
        return NO_IMAGE
    transformer = folder.config("transformer") or folder.config("transformer_2")
    image_encoder = folder.has_component("image_encoder")
    if image_encoder != (transformer.get("image_dim") is not None):
        return ("an image_encoder component but no transformer image_dim" if image_encoder
                else f"transformer image_dim {transformer['image_dim']} but no image_encoder component")
    vae = folder.config("vae")
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
        rotary_positions=True,
        image_mode=mode,
        image_required=mode == "concat",
        # A CLIP-conditioned transformer takes two images' embeddings only with a position
        # embedding for both (first-last-frame models); without CLIP the mask and latents suffice.
        last_image=mode == "concat" and (not image_encoder or transformer.get("pos_embed_seq_len") is not None),
    )
