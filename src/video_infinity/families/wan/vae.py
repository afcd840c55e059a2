"""Wan's VAE across ranks: frame counts, and each rank decoding its own latent frames exactly.

* frames: a video of ``4 * (latent frames - 1) + 1`` frames (the VAE's temporal compression is 4);
* decode: each rank decodes its own latent frames, after warming the causal decoder up on a halo of
  preceding latent frames as long as the decoder's temporal receptive field (derived from its
  layers), so the frames equal those of ``vae.decode`` on the whole latent video;
* encode: each rank encodes its own latent frames of a video (image-to-video's condition video),
  after warming the causal encoder up on the video frames of a halo of preceding latent frames as
  long as the encoder's receptive field, so the latent means equal those of ``vae.encode`` on the
  whole video.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from ...context import ClipContext
from ...engine.comm import start_exchange
from ...frames import latent_frame_count

__all__ = ["decode_wan_clip", "decode_wan_window", "denormalize_wan_latents", "normalize_wan_latents", "encode_wan_frames",
           "latent_frame_count", "stream_wan_clip", "stream_wan_window", "video_frame_count", "video_frames_of",
           "wan_decoder_receptive_field", "wan_encoder_receptive_field"]


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


def normalize_wan_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """VAE-scale latents (an encode's) in the model's scale, float32, as WanImageToVideoPipeline's
    ``prepare_latents`` makes its condition latents (the inverse of :func:`denormalize_wan_latents`)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents = latents.to(torch.float32)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean) * inv_std


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


# ----------------------------------------------------------------------------------- encode
ENCODE_TEMPORAL_COMPRESSION = 4
"""Video frames per latent frame in ``AutoencoderKLWan._encode`` (a literal 4 there): chunk 0 is video
frame 0 alone, chunk ``i >= 1`` video frames ``4i - 3 .. 4i``; latent frame ``i`` comes from chunk ``i``."""


def wan_encoder_receptive_field(vae: AutoencoderKLWan) -> int:
    """The fewest latent frames of warm-up before a latent frame that make its encoding exact.

    :func:`encode_wan_frames` starts a fresh encoder ``halo`` latent frames before a rank's first one,
    at video frame ``4 * start`` fed alone (as ``_encode`` feeds frame 0), then the chunks of 4 video
    frames that follow, which are then those of the whole-video encode. The encoder is causal and FIR
    (the norms and the attention work per frame; each causal convolution sees its last
    ``_padding[4]`` frames through its cache; each ``downsample3d`` output frame ``m`` is its
    ``time_conv`` of input frames ``2m - 2 .. 2m``, but frame 0, the first chunk's, skips it), so
    only the first few frames of each layer differ from the whole-video encode. Walking the encoder's
    layers in forward order and counting those frames at each layer's own frame rate: a convolution
    adds its look-back; a ``downsample3d`` keeps output frame ``m`` only where ``m >= 1`` (frame 0 is
    the first chunk's) and its inputs from ``2m - 2`` are exact, i.e. ``ceil((n + 2) / 2)`` frames
    differ after ``n`` did. What differs at the end, in latent frames, is the receptive field (tiny
    test VAE: 20; Wan2.1's and Wan2.2's VAEs: 28). Parallel branches (1x1 shortcuts, Wan2.2's
    ``AvgDown3D`` shortcut) reach back less than their block's main path, so the walk of the main path
    bounds them; the bound is tight for generic weights (the tests check that one frame less is not exact).
    """
    differ = 0  # leading frames of the fresh encoder's current layer that differ from the whole-video encode
    seen: set[int] = set()
    for module in itertools.chain(vae.encoder.modules(), [vae.quant_conv]):  # registration order = forward order
        if isinstance(module, WanResample) and module.mode == "downsample3d":
            conv = module.time_conv
            seen.add(id(conv))
            differ = max(1, math.ceil((differ + conv.kernel_size[0] - 1) / conv.stride[0]))
        elif isinstance(module, WanCausalConv3d) and id(module) not in seen:
            differ += module._padding[4]
    return differ


def _encode_chunk_frames(latent: int, start: int, compression: int = ENCODE_TEMPORAL_COMPRESSION) -> range:
    """Video frames fed to the encoder for latent frame ``latent`` by an encoder started at ``start``."""
    if latent == start:  # a fresh encoder's first chunk: one frame (frame 0, or the last of chunk ``start``)
        return range(compression * start, compression * start + 1)
    return range(compression * (latent - 1) + 1, compression * latent + 1)


def encode_wan_frames(
    vae: AutoencoderKLWan,
    frames: Callable[[range], torch.Tensor],
    latent_frames: range,
    halo: int | None = None,
) -> torch.Tensor:
    """The latent means of ``latent_frames`` of a video, as ``vae.encode(video).latent_dist.mode()[:, :,
    latent_frames]`` gives them (VAE scale: not normalised by ``latents_mean``/``latents_std``), shape
    (batch, z_dim, len(latent_frames), h, w), without the whole video.

    ``frames(range)`` returns those video frames (global indices), (batch, 3, n, H, W) in [-1, 1] in the
    VAE's dtype and device; it is called once per encoder chunk (1 or 4 frames), in order, and only for
    the frames from the warm-up's start to the last owned latent frame's chunk: a fresh encoder starts at
    video frame ``4 * s``, ``s = max(latent_frames.start - halo, 0)`` (default ``halo``: the encoder's
    receptive field, :func:`wan_encoder_receptive_field`), fed alone as ``_encode`` feeds frame 0, then
    the chunks of latent frames ``s + 1 ..``; the warm-up's latents are dropped. At ``s = 0`` this is
    ``_encode``'s own sequence of calls. The encoder calls have the same shapes as ``_encode``'s
    (``patch_size``'s patchify and ``use_slicing`` included), and the final 1x1 ``quant_conv`` runs per
    latent frame, so a latent frame's mean is bit for bit the same whichever range it is encoded in
    (ranks agree on any split) and equals the whole-video encode's up to that convolution's rounding
    (one call over all frames there; on CPU 1 ulp at most, seen at 2x2 latents).

    A tiling VAE (``vae.use_tiling`` at a size that tiles) encodes through ``vae.encode`` the video frames
    from ``4 * s`` to the last owned chunk at once (exact too: each tile is the same causal encode), so
    those frames are whole in memory then.
    """
    if latent_frames.step != 1 or len(latent_frames) == 0 or latent_frames.start < 0:
        raise ValueError(f"latent_frames must be a non-empty range of step 1 from >= 0, not {latent_frames}")
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    halo = wan_encoder_receptive_field(vae) if halo is None else halo
    if halo < 0:
        raise ValueError(f"halo must be >= 0, not {halo}")
    start = max(latent_frames.start - halo, 0)
    skip = latent_frames.start - start
    if hasattr(vae, "_hf_hook") and hasattr(vae._hf_hook, "pre_forward"):  # as vae.encode (CPU offload)
        vae._hf_hook.pre_forward(vae)
    with torch.no_grad():
        first = _encode_chunk_frames(start, start)
        x = frames(first)
        batch, _, _, height, width = x.shape
        if vae.use_tiling and (width > vae.tile_sample_min_width or height > vae.tile_sample_min_height):
            rest = range(first.stop, _encode_chunk_frames(latent_frames.stop - 1, start).stop)
            video = torch.cat([x, frames(rest)], dim=2) if len(rest) else x
            return vae.encode(video).latent_dist.mode()[:, :, skip:]
        slices = batch if vae.use_slicing and batch > 1 else 1  # as vae.encode: each sample alone
        count = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        caches: list[list] = [[None] * count for _ in range(slices)]
        owned: list[list[torch.Tensor]] = [[] for _ in range(slices)]
        vae.clear_cache()
        try:
            for latent in range(start, latent_frames.stop):
                if latent > start:
                    x = frames(_encode_chunk_frames(latent, start))
                if vae.config.patch_size is not None:
                    x = patchify(x, patch_size=vae.config.patch_size)
                for part, cache, out in zip(x.split(1) if slices > 1 else [x], caches, owned):
                    y = vae.encoder(part, feat_cache=cache, feat_idx=[0])
                    if latent >= latent_frames.start:
                        out.append(y)
                x = None
            # quant_conv per latent frame: its arithmetic then does not depend on how many frames a rank
            # owns (a 1x1 convolution over 1-2 frames takes another CPU kernel path than over many)
            means = [torch.cat([vae.quant_conv(y).chunk(2, dim=1)[0] for y in out], dim=2) for out in owned]
        finally:
            vae.clear_cache()
    return torch.cat(means).contiguous() if slices > 1 else means[0].contiguous()
