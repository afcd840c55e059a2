"""Wan's VAE across ranks: frame counts, and each rank decoding its own latent frames exactly.

* frames: a video of ``4 * (latent frames - 1) + 1`` frames (the VAE's temporal compression is 4);
* decode: each rank decodes its own latent frames, after warming the causal decoder up on a halo of
  preceding latent frames as long as the decoder's temporal receptive field (derived from its
  layers), so the frames equal those of ``vae.decode`` on the whole latent video.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from ...context import ClipContext
from ...engine.comm import start_exchange
from ...frames import latent_frame_count

__all__ = ["decode_wan_clip", "decode_wan_window", "denormalize_wan_latents", "latent_frame_count", "stream_wan_clip",
           "stream_wan_window", "video_frame_count", "video_frames_of", "wan_decoder_receptive_field"]


# ----------------------------------------------------------------------------------- frames
def video_frame_count(latent_frames: int, temporal_compression: int = 4) -> int:
    """Video frames decoded from ``latent_frames`` latent frames (the first gives 1, every later one 4)."""
    return temporal_compression * (latent_frames - 1) + 1


def video_frames_of(latent_frames: range, temporal_compression: int = 4) -> range:
    """Global indices of the video frames decoded from ``latent_frames`` (what a rank hands the writer)."""
    start = 0 if latent_frames.start == 0 else temporal_compression * (latent_frames.start - 1) + 1
    return range(start, video_frame_count(latent_frames.stop, temporal_compression))


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
    return torch.cat(list(stream_wan_window(vae, latents, skip)), dim=2)


def stream_wan_window(vae: AutoencoderKLWan, latents: torch.Tensor, skip: int) -> Iterator[torch.Tensor]:
    """:func:`decode_wan_window` one latent frame at a time: the video frames of each latent frame of
    ``latents[:, :, skip:]`` in turn, (batch, C, 1 or 4, h, w) in [-1, 1], so the decoded video is never
    whole in memory.

    The same calls as diffusers' ``AutoencoderKLWan._decode`` (its decoder is called one latent frame
    at a time, carrying each causal convolution's cached frames), which concatenates the frames as it
    goes (a copy of the whole video per latent frame); the frames are bit for bit those of
    ``vae.decode``. A tiling VAE decodes through ``vae.decode`` at once.
    """
    compression = vae.config.scale_factor_temporal
    tile_height = vae.tile_sample_min_height // vae.spatial_compression_ratio
    tile_width = vae.tile_sample_min_width // vae.spatial_compression_ratio
    if vae.use_tiling and (latents.shape[-1] > tile_width or latents.shape[-2] > tile_height):
        video = vae.decode(latents).sample
        yield video if skip == 0 else video[:, :, 1 + compression * (skip - 1) :]
        return
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    vae.clear_cache()
    try:
        x = vae.post_quant_conv(latents)
        for i in range(latents.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                              first_chunk=i == 0)
            if i < skip:
                continue
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield torch.clamp(out, min=-1.0, max=1.0)
    finally:
        vae.clear_cache()


def _clip_window(vae: AutoencoderKLWan, latents: torch.Tensor, ctx: ClipContext, halo: int | None
                 ) -> tuple[torch.Tensor, int]:
    """(this rank's latent frames after the preceding ``halo`` ones, from the ranks that own them, in
    the VAE's scale; how many frames of halo it starts with)."""
    halo = wan_decoder_receptive_field(vae) if halo is None else halo
    layout = ctx.layout_for(latents.shape[2])
    window, span, _ = start_exchange(latents, 2, layout, halo, 0, ctx, kind="vae_halo").wait()
    return denormalize_wan_latents(vae, window.to(vae.dtype)), layout.owned.start - span.start


def decode_wan_clip(
    vae: AutoencoderKLWan, latents: torch.Tensor, ctx: ClipContext, halo: int | None = None
) -> torch.Tensor:
    """Video frames of this rank's latent frames (model scale, (batch, C, frames, h, w)), in [-1, 1].

    The preceding ``halo`` latent frames (default: the decoder's receptive field) arrive from the
    ranks that own them; rank r's frames equal those of ``vae.decode`` of the whole latent video.
    """
    return torch.cat(list(stream_wan_clip(vae, latents, ctx, halo)), dim=2)


def stream_wan_clip(
    vae: AutoencoderKLWan, latents: torch.Tensor, ctx: ClipContext, halo: int | None = None
) -> Iterator[torch.Tensor]:
    """:func:`decode_wan_clip` one latent frame's video frames at a time. The halo is exchanged now
    (every rank calls this together); the frames are decoded as the iterator is consumed."""
    window, skip = _clip_window(vae, latents, ctx, halo)

    def frames() -> Iterator[torch.Tensor]:
        with torch.no_grad():
            yield from stream_wan_window(vae, window, skip)

    return frames()
