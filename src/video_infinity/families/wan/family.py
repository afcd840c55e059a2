"""Wan2.1 / Wan2.2 text-to-video (diffusers ``WanPipeline`` folders): the pieces around the engine.

* frames and VAE (:mod:`.vae`): each rank decodes its own latent frames exactly;
* text: only rank 0 loads the UMT5 encoder and encodes the prompts; the embeddings are broadcast;
  multi-prompt gives one embedding per *latent* frame;
* :class:`WanFamily`: the :class:`~video_infinity.families.ModelFamily` the pipeline drives, with
  WanPipeline's model call (two experts switched at the boundary timestep for Wan2.2 A14B, separate
  conditional and unconditional passes); sampling is the pipeline's one loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from ...context import ClipContext
from ...engine.comm import broadcast_from_rank0
from .vae import latent_frame_count, stream_wan_clip, video_frame_count
from ..folder import ModelFolder
from ..base import Conditioning

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- the family
@dataclass
class WanFamily:
    """Loaded components of a Wan2.1 / Wan2.2 text-to-video model (see :class:`~video_infinity.families.ModelFamily`).

    The UMT5 text encoder is loaded on first use, and only by the rank that encodes (rank 0 of the
    call's :class:`ClipContext`): the other ranks receive the embeddings and never load it.
    ``guidance_scale_2``: the low-noise expert's guidance scale for Wan2.2 A14B (None: the call's
    ``guidance_scale``, as WanPipeline).
    """

    name: ClassVar[str] = "wan"
    default_scheduler: ClassVar[str] = "model"  # the folder's flow-matching UniPC with its flow_shift
    supports_loop: ClassVar[bool] = True

    transformer: WanTransformer3DModel
    transformer_2: WanTransformer3DModel | None
    vae: AutoencoderKLWan
    scheduler_config: dict[str, Any]
    boundary_ratio: float | None
    expand_timesteps: bool
    source: str
    text_pipeline: WanPipeline | None = None
    """Tokenizer and text encoder (a WanPipeline without transformer and VAE), or None until loaded."""
    max_sequence_length: int = 512
    guidance_scale_2: float | None = None
    text_dtype: torch.dtype = field(default=torch.float32, repr=False)
    text_between_encodes: torch.device | None = field(default=None, repr=False)
    """Where the text encoder waits between encodes: the CPU when this family loaded it; None (where it
    is) for a pipeline's own encoder (``from_pipe``: the caller placed it)."""

    @property
    def model(self) -> torch.nn.Module:
        return self.transformer

    @property
    def denoisers(self) -> tuple[torch.nn.Module, ...]:
        return (self.transformer,) if self.transformer_2 is None else (self.transformer, self.transformer_2)

    # ---- finding and loading
    @classmethod
    def load(cls, model: str, base_model: str | None, torch_dtype: torch.dtype, device: torch.device) -> WanFamily:
        if base_model is not None:
            raise ValueError("base_model: a Wan folder holds every component; leave base_model unset")
        folder = ModelFolder.find(model)
        index = folder.index if folder is not None else {}

        def transformer(subfolder: str) -> WanTransformer3DModel:
            loaded = WanTransformer3DModel.from_pretrained(model, subfolder=subfolder, torch_dtype=torch_dtype)
            return loaded.to(device).eval().requires_grad_(False)

        # The VAE stays in float32, as diffusers' Wan examples load it (its decode is a small part of a run).
        vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        return cls(
            transformer=transformer("transformer"),
            transformer_2=transformer("transformer_2") if folder is not None and folder.has_component("transformer_2") else None,
            vae=vae.to(device).eval().requires_grad_(False),
            scheduler_config=dict(scheduler_class.load_config(model, subfolder="scheduler")),
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            source=str(model),
            text_dtype=torch_dtype,
        )

    @classmethod
    def can_take(cls, pipeline: Any) -> bool:
        return isinstance(pipeline, WanPipeline) and isinstance(pipeline.transformer, WanTransformer3DModel)

    @classmethod
    def from_pipe(cls, pipeline: Any) -> WanFamily:
        source = getattr(pipeline, "name_or_path", None) or getattr(pipeline.config, "_name_or_path", None) or type(pipeline).__name__
        text = None
        if pipeline.text_encoder is not None:
            text = WanPipeline(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, vae=None, scheduler=None)
        return cls(
            transformer=pipeline.transformer,
            transformer_2=pipeline.transformer_2,
            vae=pipeline.vae,
            scheduler_config=dict(pipeline.scheduler.config),
            boundary_ratio=pipeline.config.boundary_ratio,
            expand_timesteps=bool(pipeline.config.expand_timesteps),
            source=str(source),
            text_pipeline=text,
            text_dtype=pipeline.transformer.dtype,
        )

    # ---- shapes
    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        # The sampling loop's latents stay float32, as WanPipeline keeps them; each model call casts
        # its input to the transformer's dtype (bfloat16 for the published weights).
        return torch.float32

    @property
    def spatial_multiple(self) -> int:
        # The VAE's compression times the transformer's spatial patch: 16 for Wan2.1.
        _, patch_h, patch_w = self.transformer.config.patch_size
        return self.vae.config.scale_factor_spatial * max(patch_h, patch_w)

    def latent_frames(self, video_frames: int) -> int:
        return latent_frame_count(video_frames, self.vae.config.scale_factor_temporal)

    def video_frames(self, latent_frames: int) -> int:
        return video_frame_count(latent_frames, self.vae.config.scale_factor_temporal)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.vae.config.scale_factor_spatial
        return (self.transformer.config.in_channels, height // scale, width // scale)

    # ---- text
    def _text(self) -> WanPipeline:
        if self.text_pipeline is None:
            # Loaded here, on the encoding rank only (UMT5-XXL is ~11 GB).
            logger.info("loading the text encoder from %s", self.source)
            pipe = WanPipeline.from_pretrained(self.source, transformer=None, transformer_2=None, vae=None,
                                               torch_dtype=self.text_dtype)
            pipe.text_encoder.eval().requires_grad_(False)  # on the CPU between encodes (see encode_prompts)
            self.text_pipeline = pipe
            self.text_between_encodes = torch.device("cpu")
        return self.text_pipeline

    def encode_prompts(self, prompts: list[str], ctx: ClipContext | None = None) -> torch.Tensor:
        """UMT5 embeddings (len(prompts), max_sequence_length, text_dim) as ``WanPipeline.encode_prompt``
        makes them (cleaning, padding, zeroed tail); rank 0 encodes and broadcasts to the others."""
        ctx = ctx or ClipContext()

        def encode() -> torch.Tensor:
            pipe = self._text()
            if self.text_between_encodes is not None:
                pipe.text_encoder.to(self.device)
            try:
                with torch.no_grad():
                    embeds, _ = pipe.encode_prompt(
                        prompt=list(prompts), do_classifier_free_guidance=False,
                        max_sequence_length=self.max_sequence_length, device=self.device)
            finally:
                if self.text_between_encodes is not None and self.text_between_encodes != self.device:
                    # UMT5-XXL is ~11 GB in bf16: off the GPU once the prompts are encoded, so the
                    # denoising has the card (two moves per encode: about a second each way).
                    pipe.text_encoder.to(self.text_between_encodes)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            return embeds

        shape = (len(prompts), self.max_sequence_length, self.transformer.config.text_dim)
        return broadcast_from_rank0(ctx, encode, shape, self.transformer.dtype, self.device)

    def conditioning(self, frame_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, guidance_scale: float,
                     fps: int | None) -> Conditioning:
        # One embedding for the whole clip takes the transformer's ordinary path; otherwise one per
        # latent frame (the engine's cross-attention processor gives each frame its own).
        same = all(torch.equal(frame_embeds[0], e) for e in frame_embeds[1:])
        text = frame_embeds[:1] if same else frame_embeds[None]
        second = guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        return Conditioning(text, negative_embeds if guidance_scale > 1.0 else None, guidance_scale,
                            {"guidance_scale_2": second})

    # ---- one step
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """WanPipeline's step: the high-noise expert (and ``guidance_scale``) while ``timestep`` >= the
        boundary, else the low-noise one (and ``guidance_scale_2``); conditional and unconditional passes."""
        boundary = None if self.boundary_ratio is None else self.boundary_ratio * self.scheduler_config["num_train_timesteps"]
        high_noise = boundary is None or self.transformer_2 is None or timestep >= boundary
        model = self.transformer if high_noise else self.transformer_2
        scale = cond.guidance_scale if high_noise else cond.extra["guidance_scale_2"]
        x = latents.to(model.dtype)
        if self.expand_timesteps:  # Wan2.2 TI2V: one timestep per token (text-to-video: all equal)
            _, patch_h, patch_w = model.config.patch_size
            tokens = x.shape[2] * (x.shape[3] // patch_h) * (x.shape[4] // patch_w)
            t = timestep.expand(x.shape[0], tokens)
        else:
            t = timestep.expand(x.shape[0])
        pred = model(x, t, cond.prompt_embeds, return_dict=False)[0]
        if cond.negative_embeds is None:
            return pred
        uncond = model(x, t, cond.negative_embeds, return_dict=False)[0]
        return uncond + scale * (pred - uncond)

    # ---- decode
    def decode(self, latents: torch.Tensor, split_invariant: bool, ctx: ClipContext | None = None) -> Iterator[torch.Tensor]:
        """The video frames of this rank's latent frames, float (n, H, W, 3) in [0, 1].

        The halo of preceding latent frames is exchanged now (every rank calls this together); the
        frames equal those of ``vae.decode`` of the whole latent video (see :func:`decode_wan_clip`), and
        are decoded one latent frame at a time as the iterator is consumed (the video is never whole in
        memory). ``split_invariant`` needs nothing more: the VAE decodes one latent frame per call."""
        ctx = ctx or ClipContext(total_frames=latents.shape[2])
        videos = stream_wan_clip(self.vae, latents, ctx)  # each (1, 3, 1 or 4 frames, H, W) in [-1, 1]
        return ((video[0].float().permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1).contiguous() for video in videos)
