"""The UNet3D family: ModelScope T2V, ZeroScope, VideoCrafter2 (fps-conditioned) and the demo model.

CLIP text encoder, a 2D VAE applied frame by frame, ``UNet3DConditionModel`` (or VideoCrafter2's
:class:`~video_infinity.families.unet3d.model.FpsUNet3DConditionModel`); one latent frame per video frame.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...context import ClipContext
from ...denoise import sample
from ..base import Conditioning
from .model import DEFAULT_FPS, FpsUNet3DConditionModel, load_model

logger = logging.getLogger(__name__)

DECODE_CHUNK_FRAMES = 8
"""Frames decoded by the VAE at once: bounds decode memory whatever the clip length."""


@dataclass
class UNet3DFamily:
    """Loaded components of a UNet3D text-to-video model (see :class:`~video_infinity.families.ModelFamily`)."""

    name: ClassVar[str] = "unet3d"
    default_scheduler: ClassVar[str] = "sde-dpmsolver++"  # what the original's published runs used
    supports_loop: ClassVar[bool] = True
    rotary_positions: ClassVar[bool] = False  # no positions in the temporal attention: no attn.rotary_clip
    image_mode: ClassVar[str | None] = None  # text to video only

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    fps_conditioned: bool
    source: str

    @property
    def model(self) -> torch.nn.Module:
        return self.unet

    @property
    def denoisers(self) -> tuple[torch.nn.Module, ...]:
        return (self.unet,)

    # ---- finding and loading
    @classmethod
    def load(cls, model: str, base_model: str | None, torch_dtype: torch.dtype, device: torch.device) -> UNet3DFamily:
        c = load_model(model, base_model, torch_dtype=torch_dtype, device=device)
        return cls(c.tokenizer, c.text_encoder, c.vae, c.unet, c.scheduler_config, c.fps_conditioned, c.source)

    @classmethod
    def can_take(cls, pipeline: Any) -> bool:
        from diffusers import UNet3DConditionModel

        return isinstance(getattr(pipeline, "unet", None), UNet3DConditionModel)

    @classmethod
    def from_pipe(cls, pipeline: Any) -> UNet3DFamily:
        unet = pipeline.unet
        fps = isinstance(unet, FpsUNet3DConditionModel) and bool(unet.config.fps_cond)
        source = getattr(pipeline, "name_or_path", None) or getattr(pipeline.config, "_name_or_path", None) or type(pipeline).__name__
        return cls(pipeline.tokenizer, pipeline.text_encoder, pipeline.vae, unet, dict(pipeline.scheduler.config),
                   fps, str(source))

    # ---- shapes
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def spatial_multiple(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_frames(self, video_frames: int) -> int:
        return video_frames

    def video_frames(self, latent_frames: int) -> int:
        return latent_frames

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.spatial_multiple
        return (self.unet.config.in_channels, height // scale, width // scale)

    # ---- text
    def encode_prompts(self, prompts: list[str], ctx: ClipContext | None = None) -> torch.Tensor:
        """CLIP embeddings (len(prompts), seq, dim), as diffusers' text-to-video pipeline encodes them;
        too-long prompts are truncated with a warning. Every rank encodes (CLIP is small)."""
        tokenizer = self.tokenizer
        max_length = tokenizer.model_max_length
        for prompt in prompts:
            length = len(tokenizer(prompt).input_ids)
            if length > max_length:
                logger.warning("prompt truncated to the tokenizer's %d tokens (it has %d): %.60s...", max_length,
                               length, prompt)
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds.to(self.unet.dtype)

    def conditioning(self, frame_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, guidance_scale: float,
                     fps: int | None) -> Conditioning:
        # One embedding for the whole clip takes the UNet's ordinary path; otherwise one per frame
        # (the engine's cross-attention hook gives each frame its own).
        same = all(torch.equal(frame_embeds[0], e) for e in frame_embeds[1:])
        text = frame_embeds[:1] if same else frame_embeds[None]
        extra = {"fps": DEFAULT_FPS if fps is None else fps} if self.fps_conditioned else {}
        return Conditioning(text, negative_embeds if guidance_scale > 1.0 else None, guidance_scale, extra)

    # ---- one step
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        guided = cond.negative_embeds is not None
        text = cond.prompt_embeds
        if guided:
            negative = cond.negative_embeds
            if negative.dim() < text.dim():  # per-frame text: the same negative for every frame
                negative = negative.unsqueeze(1).expand(-1, text.shape[1], -1, -1)
            text = torch.cat([negative.expand(text.shape[0], *negative.shape[1:]), text])
            latents = torch.cat([latents] * 2)
        pred = self.unet(latents, timestep, encoder_hidden_states=text, **cond.extra).sample
        if not guided:
            return pred
        uncond, conditional = pred.chunk(2)
        return uncond + cond.guidance_scale * (conditional - uncond)

    # ---- decode
    def decode(self, latents: torch.Tensor, split_invariant: bool, ctx: ClipContext | None = None) -> Iterator[torch.Tensor]:
        """Decode (1, C, F, h, w) latents to float frames (n, H, W, 3) in [0, 1], ``DECODE_CHUNK_FRAMES`` at a time.

        Frames decode independently (``ctx`` is not needed). ``split_invariant``: every VAE call gets exactly ``DECODE_CHUNK_FRAMES`` frames (the last chunk
        padded with copies of its last frame), because convolution kernels pick their algorithm by
        batch size: a frame then decodes to the same pixels whatever the clip it belongs to.
        """
        vae = self.vae
        frames = latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
        for start in range(0, frames.shape[0], DECODE_CHUNK_FRAMES):
            chunk = frames[start : start + DECODE_CHUNK_FRAMES]
            count = chunk.shape[0]
            if split_invariant and count < DECODE_CHUNK_FRAMES:
                chunk = torch.cat([chunk, chunk[-1:].expand(DECODE_CHUNK_FRAMES - count, *chunk.shape[1:])])
            with torch.no_grad():
                images = vae.decode(chunk.to(vae.dtype)).sample[:count]
            yield (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def denoise(
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    seed: int,
    frames: range,
    num_steps: int,
    guidance_scale: float = 1.0,
    negative_embeds: torch.Tensor | None = None,
    eta: float = 0.0,
    unet_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``sample`` (:func:`video_infinity.denoise.sample`) with a bare UNet3D: ``prompt_embeds`` (batch, seq, dim), or (batch, frames, seq, dim)
    for one embedding per frame (needs a UNet prepared by ``parallelize``); guidance as diffusers."""
    if guidance_scale > 1.0 and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (the unconditional text embedding)")
    cond = Conditioning(prompt_embeds, negative_embeds if guidance_scale > 1.0 else None, guidance_scale,
                        dict(unet_kwargs or {}))
    family = UNet3DFamily(None, None, None, unet, {}, False, "unet")  # only its model call is used

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return family.predict_noise(x, t, cond)

    return sample(predict, scheduler, latents, seed=seed, frames=frames, num_steps=num_steps, eta=eta)
