"""Wan2.1 / Wan2.2 text-to-video (diffusers ``WanPipeline`` folders): the pieces around the engine.

* frames: a video of ``4 * (latent frames - 1) + 1`` frames (the VAE's temporal compression is 4);
* text: only rank 0 loads the UMT5 encoder and encodes the prompts; the embeddings are broadcast;
  multi-prompt gives one embedding per *latent* frame;
* VAE: each rank decodes its own latent frames, after warming the causal decoder up on a halo of
  preceding latent frames as long as the decoder's temporal receptive field (derived from its
  layers), so the frames equal those of ``vae.decode`` on the whole latent video;
* :func:`generate_wan`: one rank's sampling loop, with WanPipeline's denoising structure (two experts
  switched at the boundary timestep for Wan2.2 A14B, separate conditional/unconditional passes).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from ..config import EngineConfig
from ..context import ClipContext
from ..denoise import initial_latents
from ..engine import parallelize
from ..halo import start_exchange
from ..prompts import frame_embeddings, frame_prompt_mix, unique_prompts

logger = logging.getLogger(__name__)

WAN_PIPELINE_CLASSES = ("WanPipeline",)
"""``_class_name`` values of ``model_index.json`` that this family serves (text-to-video)."""


# ----------------------------------------------------------------------------------- the folder
def read_model_index(folder: str | Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"model: {folder} has no model_index.json; give a diffusers pipeline folder")
    return json.loads(path.read_text())


def is_wan_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a diffusers Wan text-to-video pipeline (by its ``model_index.json``)."""
    path = Path(folder) / "model_index.json"
    return path.is_file() and json.loads(path.read_text()).get("_class_name") in WAN_PIPELINE_CLASSES


def load_wan_scheduler(folder: str | Path, flow_shift: float | None = None):
    """The folder's own scheduler (UniPC with its ``flow_shift`` for Wan); ``flow_shift`` overrides it."""
    library, class_name = read_model_index(folder)["scheduler"]
    if library != "diffusers" or not hasattr(diffusers, class_name):
        raise ValueError(f"model: unsupported scheduler {library}.{class_name} in {folder}/model_index.json")
    overrides = {} if flow_shift is None else {"flow_shift": flow_shift}
    return getattr(diffusers, class_name).from_pretrained(folder, subfolder="scheduler", **overrides)


# ----------------------------------------------------------------------------------- frames
def latent_frame_count(num_frames: int, temporal_compression: int = 4) -> int:
    """Latent frames of a ``num_frames`` video: (num_frames - 1) / 4 + 1; other counts are an error."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression:
        below = max(1, num_frames - (num_frames - 1) % temporal_compression)
        above = below + temporal_compression
        raise ValueError(
            f"num_frames: Wan videos have {temporal_compression}k+1 frames; {num_frames} is not one, "
            f"use {below} or {above}"
        )
    return (num_frames - 1) // temporal_compression + 1


def video_frame_count(latent_frames: int, temporal_compression: int = 4) -> int:
    """Video frames decoded from ``latent_frames`` latent frames (the first gives 1, every later one 4)."""
    return temporal_compression * (latent_frames - 1) + 1


def video_frames_of(latent_frames: range, temporal_compression: int = 4) -> range:
    """Global indices of the video frames decoded from ``latent_frames`` (what a rank hands the writer)."""
    start = 0 if latent_frames.start == 0 else temporal_compression * (latent_frames.start - 1) + 1
    return range(start, video_frame_count(latent_frames.stop, temporal_compression))


def check_wan_size(height: int, width: int, multiple: int = 16) -> None:
    """Height and width must be positive multiples of VAE compression x patch size (16 for Wan2.1)."""
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            nearest = max(multiple, value // multiple * multiple)
            raise ValueError(f"{name}: Wan needs a positive multiple of {multiple}, got {value}; use {nearest}")


# ----------------------------------------------------------------------------------- text
def broadcast_from_rank0(
    ctx: ClipContext, produce: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """``produce()`` on rank 0 only, sent to every rank (others never call it)."""
    if ctx.rank == 0:
        tensor = produce().to(device=device, dtype=dtype).contiguous()
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"rank 0 produced shape {tuple(tensor.shape)}, the other ranks expect {tuple(shape)}")
    else:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    if ctx.distributed:
        dist.broadcast(tensor, src=ctx.global_rank(0), group=ctx.group)
    return tensor


def encode_wan_prompts(
    folder: str | Path,
    prompts: list[str],
    ctx: ClipContext,
    *,
    text_dim: int,
    negative_prompt: str = "",
    max_sequence_length: int = 512,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings (len(prompts), seq, dim), negative embedding (1, seq, dim)), on every rank.

    Rank 0 loads the tokenizer and the UMT5 encoder (diffusers' ``WanPipeline.encode_prompt``, so
    the same cleaning, padding and zeroed tail) and broadcasts; other ranks never load the encoder.
    Each distinct prompt is encoded once.
    """
    distinct, index = unique_prompts(prompts)

    def encode() -> torch.Tensor:
        pipe = WanPipeline.from_pretrained(folder, transformer=None, transformer_2=None, vae=None, torch_dtype=dtype)
        with torch.no_grad():
            embeds, negative = pipe.encode_prompt(
                prompt=distinct, negative_prompt=[negative_prompt] * len(distinct), do_classifier_free_guidance=True,
                max_sequence_length=max_sequence_length, device=torch.device(device),
            )
        return torch.cat([embeds, negative[:1]])

    both = broadcast_from_rank0(ctx, encode, (len(distinct) + 1, max_sequence_length, text_dim), dtype, device)
    return both[:-1][index], both[-1:]


def frame_text(
    embeds: torch.Tensor, total_latent_frames: int, owned: range, transition_frames: int = 0
) -> torch.Tensor:
    """Text for the rank's transformer calls: (1, seq, dim) for one prompt, else (1, frames, seq, dim)
    with each owned latent frame's (possibly blended) prompt embedding."""
    if embeds.shape[0] == 1:
        return embeds
    mixes = frame_prompt_mix(total_latent_frames, embeds.shape[0], transition_frames)
    return frame_embeddings(embeds, [mixes[f] for f in owned])[None]


# ----------------------------------------------------------------------------------- VAE
def wan_decoder_receptive_field(vae: AutoencoderKLWan) -> int:
    """Latent frames before a latent frame that its decoded frames depend on.

    Every causal convolution of the decoder caches its last 2 input frames, so it looks back
    2 frames at its own frame rate; after each temporal upsampler a latent frame is 2x more frames.
    Summing the look-back of every convolution in order, in latent frames, bounds how far back an
    output frame can see (Wan2.1's VAE: 38; the attention and norms work per frame).
    """
    reach, frames_per_latent = 0.0, 1
    seen: set[int] = set()
    for module in vae.decoder.modules():  # registration order = forward order for this decoder
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            seen.add(id(module.time_conv))
            reach += module.time_conv._padding[4] / frames_per_latent
            frames_per_latent *= 2
        elif isinstance(module, WanCausalConv3d) and id(module) not in seen:
            reach += module._padding[4] / frames_per_latent
    return math.ceil(reach)


def denormalize_wan_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """The model's latents in the VAE's own scale (as WanPipeline does before decoding)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents * std + mean


def decode_wan_window(vae: AutoencoderKLWan, latents: torch.Tensor, skip: int) -> torch.Tensor:
    """Decode consecutive VAE-scale latent frames as ``vae.decode`` does when they start a video, and
    return the frames of ``latents[:, :, skip:]`` only (the first ``skip`` frames warm the caches up)."""
    video = vae.decode(latents).sample
    if skip == 0:
        return video
    return video[:, :, 1 + vae.config.scale_factor_temporal * (skip - 1) :]


def decode_wan_clip(
    vae: AutoencoderKLWan, latents: torch.Tensor, ctx: ClipContext, halo: int | None = None
) -> torch.Tensor:
    """Video frames of this rank's latent frames (model scale, (batch, C, frames, h, w)), in [-1, 1].

    The preceding ``halo`` latent frames (default: the decoder's receptive field) arrive from the
    ranks that own them; rank r's frames equal those of ``vae.decode`` of the whole latent video.
    """
    halo = wan_decoder_receptive_field(vae) if halo is None else halo
    layout = ctx.layout_for(latents.shape[2])
    window, span, _ = start_exchange(latents, 2, layout, halo, 0, ctx, kind="vae_halo").wait()
    with torch.no_grad():
        latents = denormalize_wan_latents(vae, window.to(vae.dtype))
        return decode_wan_window(vae, latents, layout.owned.start - span.start)


# ----------------------------------------------------------------------------------- sampling
@dataclass
class WanClip:
    """One rank's result: its latent frames ``frames`` and, if decoded, their video frames."""

    latents: torch.Tensor
    frames: range
    video: torch.Tensor | None


def generate_wan(
    folder: str | Path,
    prompts: list[str] | str,
    ctx: ClipContext,
    *,
    num_frames: int,
    height: int = 480,
    width: int = 832,
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    guidance_scale_2: float | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    engine_config: EngineConfig | dict | None = None,
    transition_frames: int = 0,
    max_sequence_length: int = 512,
    flow_shift: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    decode: bool = True,
) -> WanClip:
    """Sample this rank's latent frames of one Wan video (every rank calls it with the same arguments).

    ``ctx.total_frames`` must be the video's latent frame count. The loop is WanPipeline's (expert
    switch at ``boundary_ratio``, conditional and unconditional passes, the folder's scheduler), with
    the transformers parallelized by the engine and the initial noise drawn per latent frame from
    (seed, frame), so the result does not depend on the number of ranks.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    index = read_model_index(folder)
    if index.get("_class_name") not in WAN_PIPELINE_CLASSES:
        raise ValueError(
            f"model: {folder} is a {index.get('_class_name')}, not a Wan text-to-video pipeline (WanPipeline)"
        )
    vae_config = AutoencoderKLWan.load_config(folder, subfolder="vae")
    temporal, spatial = vae_config.get("scale_factor_temporal", 4), vae_config.get("scale_factor_spatial", 8)
    latent_frames = latent_frame_count(num_frames, temporal)
    patch = WanTransformer3DModel.load_config(folder, subfolder="transformer")["patch_size"]
    check_wan_size(height, width, spatial * max(patch[1], patch[2]))
    if ctx.total_frames != latent_frames:
        raise ValueError(
            f"context: total_frames must be the video's latent frame count {latent_frames}, got {ctx.total_frames}"
        )

    def load_transformer(subfolder: str) -> WanTransformer3DModel:
        return WanTransformer3DModel.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype).to(device).eval()

    transformer = load_transformer("transformer")
    experts = [transformer]
    if index.get("transformer_2") and index["transformer_2"][0] is not None:
        experts.append(load_transformer("transformer_2"))
    guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
    guided = guidance_scale > 1.0 or (len(experts) > 1 and guidance_scale_2 > 1.0)

    embeds, negative = encode_wan_prompts(
        folder, prompts, ctx, text_dim=transformer.config.text_dim, negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length, dtype=dtype, device=device,
    )
    text = frame_text(embeds, latent_frames, ctx.frames, transition_frames)
    scheduler = load_wan_scheduler(folder, flow_shift)
    handles = [parallelize(expert, engine_config, ctx) for expert in experts]
    try:
        latents = initial_latents(
            seed, ctx.frames, (1, transformer.config.in_channels, height // spatial, width // spatial),
            scheduler.init_noise_sigma, torch.float32, device,
        )
        scheduler.set_timesteps(num_inference_steps, device=device)
        boundary = index.get("boundary_ratio")
        boundary_timestep = None if boundary is None else boundary * scheduler.config.num_train_timesteps
        tokens = len(ctx.frames) * (height // spatial // patch[1]) * (width // spatial // patch[2])
        for t in scheduler.timesteps:
            high_noise = boundary_timestep is None or t >= boundary_timestep
            model = experts[0] if high_noise or len(experts) == 1 else experts[1]
            scale = guidance_scale if high_noise else guidance_scale_2
            model_input = latents.to(dtype)
            timestep = t.expand(1, tokens) if index.get("expand_timesteps") else t.expand(1)
            with torch.no_grad():
                noise_pred = model(model_input, timestep, text, return_dict=False)[0]
                if guided:
                    noise_uncond = model(model_input, timestep, negative, return_dict=False)[0]
                    noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    video = None
    if decode:
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).to(device).eval()
        video = decode_wan_clip(vae, latents, ctx)
    return WanClip(latents, ctx.frames, video)
