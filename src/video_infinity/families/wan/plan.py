"""Wan's memory plan: its components built from the folder's config files alone on the meta device
(no weights read), and each stage of a run measured there (:mod:`video_infinity.plan`).

* prompt encoding (rank 0): the UMT5 encoder's weights and one call on the run's prompts
  (``max_sequence_length`` tokens each);
* one denoising step (every rank): the transformers' weights (both experts of Wan2.2 A14B stay
  loaded), the rank's latents and text embeddings, and the conditional and unconditional calls
  through the engine (``parallelize`` with the run's engine settings on the rank's clip, in a fake
  process group: every exchange buffer is allocated as on the real rank);
* VAE decode (every rank): the VAE's weights (float32, as loaded) and the streamed decode of its
  latent frames (one latent frame's decoder call at a time, with the causal caches);
* image conditioning (image-to-video): every rank's encode of its condition video chunk by chunk
  (with the encoder's warm-up), and rank 0's CLIP image encoder (Wan2.1 I2V).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...context import ClipContext
from ...memory import Measurement, measure, parameter_bytes
from .detect import clip_image_tokens

__all__ = ["clip_stage", "decode_stage", "denoise_stage", "encode_stage", "meta_components", "meta_transformer",
           "step_measure", "text_stage"]


def _config(folder: Path, component: str) -> dict[str, Any]:
    return json.loads((folder / component / "config.json").read_text())


def meta_transformer(config: dict[str, Any], dtype: torch.dtype):
    """A ``WanTransformer3DModel`` of ``config`` on the meta device, in ``dtype`` but for diffusers'
    float32 modules (``_keep_in_fp32_modules``), as ``from_pretrained(torch_dtype=dtype)`` loads it."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    keep = set(model._keep_in_fp32_modules or [])
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if set(name.split(".")) & keep else dtype)
    return model.eval()


def meta_components(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The transformer(s) and VAE on the meta device, from their configs, in the dtypes a run loads
    them with (the transformers in ``dtype`` but diffusers' float32 modules; the VAE in float32)."""
    from diffusers import AutoencoderKLWan

    def transformer(component: str, **change: Any) -> torch.nn.Module:
        return meta_transformer({**_config(folder, component), **change}, dtype)

    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(_config(folder, "vae")).eval()
    index = json.loads((folder / "model_index.json").read_text())
    second = (folder / "transformer_2" / "config.json").is_file()
    # The step is measured on one and two blocks (each block's keys, values and temporaries are freed
    # before the next: the peak of two is that of any depth) and its FLOPs extrapolated by depth.
    layers = _config(folder, "transformer")["num_layers"]
    return {"transformer": transformer("transformer"), "transformer_2": transformer("transformer_2") if second else None,
            "probes": (transformer("transformer", num_layers=1), transformer("transformer", num_layers=min(2, layers))),
            "layers": layers, "vae": vae, "expand_timesteps": bool(index.get("expand_timesteps", False))}


def text_stage(folder: Path, dtype: torch.dtype, prompts: int, sequence_length: int = 512) -> tuple[int, Measurement]:
    """(weights bytes, one encoder call on ``prompts`` prompts) of the UMT5 text encoder."""
    from transformers import AutoConfig, UMT5EncoderModel

    config = AutoConfig.from_pretrained(folder / "text_encoder")
    with torch.device("meta"):
        encoder = UMT5EncoderModel(config).to(dtype).eval()
    ids = torch.zeros(prompts, sequence_length, dtype=torch.long, device="meta")
    # No attention mask: transformers inspects a mask's values (which meta tensors have not); the
    # activations are the same size either way.
    return parameter_bytes(encoder), measure(lambda: encoder(ids))


def step_measure(model: torch.nn.Module, engine: Any, ctx: ClipContext, latent_hw: tuple[int, int],
                 expand_timesteps: bool, guidance: bool, per_frame_text: bool = False,
                 sequence_length: int = 512, image_tokens: int = 0) -> Measurement:
    """One denoising step of this rank through the engine on meta tensors, as ``WanFamily.predict_noise``
    makes it: the sampler's float32 latents cast to the model's dtype (image-to-video: the mask and image
    latents concatenated, the model's input channels), the conditional call (and with ``guidance`` the
    unconditional one and their combination); one timestep per token when ``expand_timesteps`` (Wan2.2
    TI2V); text per latent frame when ``per_frame_text``; ``image_tokens`` CLIP tokens (Wan2.1 I2V)."""
    from ... import parallelize

    height, width = latent_hw
    frames = len(ctx.frames)
    latents = torch.empty(1, model.config.in_channels, frames, height, width, device="meta")
    text_dim = model.config.text_dim
    text_shape = (1, frames, sequence_length, text_dim) if per_frame_text else (1, sequence_length, text_dim)
    text = torch.empty(text_shape, device="meta", dtype=model.dtype)
    negative = torch.empty(1, sequence_length, text_dim, device="meta", dtype=model.dtype)
    _, patch_h, patch_w = model.config.patch_size
    tokens = frames * (height // patch_h) * (width // patch_w)
    timestep = torch.zeros(1, tokens, device="meta") if expand_timesteps else torch.zeros(1, device="meta")
    image = None
    if image_tokens and model.config.image_dim is not None:
        image = torch.empty(1, image_tokens, model.config.image_dim, device="meta", dtype=model.dtype)

    def step() -> torch.Tensor:
        x = latents.to(model.dtype)
        pred = model(x, timestep, text, image, return_dict=False)[0]
        if not guidance:
            return pred
        uncond = model(x, timestep, negative, image, return_dict=False)[0]
        return uncond + 5.0 * (pred - uncond)

    handle = parallelize(model, engine, ctx)
    try:
        return measure(step)
    finally:
        handle.remove()


def denoise_stage(components: dict[str, Any], engine: Any, ctx: ClipContext, latent_shape: tuple[int, int, int],
                  per_frame_text: bool, guidance: bool, sequence_length: int = 512,
                  image_tokens: int = 0) -> tuple[int, Measurement]:
    """(weights bytes, one denoising step of this rank: :func:`step_measure` on one and two blocks, the
    FLOPs extrapolated to the model's depth)."""
    experts = [m for m in (components["transformer"], components["transformer_2"]) if m is not None]
    first, second = (step_measure(probe, engine, ctx, latent_shape[1:], components["expand_timesteps"], guidance,
                                  per_frame_text, sequence_length, image_tokens) for probe in components["probes"])
    per_block = second.flops - first.flops
    step = Measurement(max(first.peak_bytes, second.peak_bytes), first.flops + (components["layers"] - 1) * per_block)
    return sum(parameter_bytes(m) for m in experts), step


def decode_stage(components: dict[str, Any], latent_shape: tuple[int, int, int], frames: int = 3
                 ) -> tuple[int, Measurement]:
    """(weights bytes, the streamed decode of ``frames`` latent frames: one latent frame's decoder
    call at a time with the causal caches; each frame's output handed on and dropped, as the writer
    does), float32 as a run loads the VAE. Its FLOPs are per latent frame (their mean over ``frames``)."""
    from .vae import stream_wan_window

    vae = components["vae"]
    _, height, width = latent_shape
    latents = torch.empty(1, vae.config.z_dim, frames, height, width, device="meta")

    def decode() -> None:
        for _ in stream_wan_window(vae, latents, 0):
            pass

    measured = measure(decode)
    return parameter_bytes(vae), Measurement(measured.peak_bytes, measured.flops // frames)


def encode_stage(components: dict[str, Any], latent_shape: tuple[int, int, int], frames: int = 3
                 ) -> tuple[int, Measurement, int]:
    """(VAE weights bytes, the encode of ``frames`` latent frames of a condition video chunk by chunk with
    the causal caches, as :func:`~.vae.encode_wan_frames` makes it, float32 as a run loads the VAE, its
    FLOPs per latent frame (their mean over ``frames``); the latent frames of warm-up a rank encodes
    before its own, at most: the encoder's receptive field)."""
    from .vae import encode_wan_frames, wan_encoder_receptive_field

    vae = components["vae"]
    _, height, width = latent_shape
    scale = vae.config.scale_factor_spatial

    def video(chunk: range) -> torch.Tensor:
        return torch.empty(1, 3, len(chunk), height * scale, width * scale, device="meta")

    measured = measure(lambda: encode_wan_frames(vae, video, range(0, frames), halo=0))
    return parameter_bytes(vae), Measurement(measured.peak_bytes, measured.flops // frames), wan_encoder_receptive_field(vae)


def clip_stage(folder: Path, images: int) -> tuple[int, Measurement, int]:
    """(weights bytes, one call on ``images`` images, tokens per image) of the CLIP image encoder
    (Wan2.1 I2V), float32 as this package loads it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig.from_pretrained(folder / "image_encoder")
    with torch.device("meta"):
        encoder = CLIPVisionModel(config).eval()
    pixels = torch.empty(images, 3, config.image_size, config.image_size, device="meta")
    tokens = clip_image_tokens(config.image_size, config.patch_size)
    return parameter_bytes(encoder), measure(lambda: encoder(pixel_values=pixels, output_hidden_states=True)), tokens
