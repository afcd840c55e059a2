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
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

from ...context import ClipContext
from ...engine.comm import broadcast_from_rank0
from ...images import video_length
from .detect import NO_IMAGE, clip_image_tokens, image_mode as folder_image_mode, transformer_image_mode
from . import vae as wan_vae
from .vae import latent_frame_count, normalize_wan_latents, stream_wan_clip, video_frame_count
from ..folder import FolderFacts, ModelFolder
from ..base import Conditioning, ImageInputs

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
    rotary_positions: ClassVar[bool] = True  # attn.rotary_clip applies

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
    image_mode: str | None = None
    """How the transformer takes a start image: ``"concat"`` (mask and image latents concatenated to
    the noise: Wan2.1 I2V, Wan2.2 A14B I2V), ``"first_frame"`` (Wan2.2 TI2V: the image's latents in
    place of the first latent frame, timestep 0 on its tokens) or None (text to video)."""
    image_encoder: Any = field(default=None, repr=False)
    """The CLIP vision model of Wan2.1 I2V (with ``image_processor``), loaded on first use by the rank
    that encodes; None for models without image embeddings or until loaded."""
    image_processor: Any = field(default=None, repr=False)
    image_between_encodes: torch.device | None = field(default=None, repr=False)
    """Where the image encoder waits between encodes: the CPU when this family loaded it; None (where it
    is) for a pipeline's own (``from_pipe``)."""
    image_embed_shape: tuple[int, int] | None = None
    """(tokens, width) of one image's CLIP embeddings, for the ranks that receive them; None: no CLIP."""

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
        has_transformer = folder is None or folder.has_component("transformer")
        first = transformer("transformer") if has_transformer else None
        second = transformer("transformer_2") if folder is not None and folder.has_component("transformer_2") else None
        mode = folder_image_mode(folder)[0] if folder is not None else None
        embed_shape = None
        if folder is not None and folder.has_component("image_encoder"):
            vision = folder.config("image_encoder")
            embed_shape = (clip_image_tokens(vision.get("image_size", 224), vision.get("patch_size", 32)),
                           int(vision.get("hidden_size", 768)))
        return cls(
            transformer=first if first is not None else second,
            transformer_2=second if first is not None else None,
            vae=vae.to(device).eval().requires_grad_(False),
            scheduler_config=dict(scheduler_class.load_config(model, subfolder="scheduler")),
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            source=str(model),
            text_dtype=torch_dtype,
            image_mode=mode,
            image_embed_shape=embed_shape,
        )

    @classmethod
    def can_take(cls, pipeline: Any) -> bool:
        denoiser = pipeline.transformer if getattr(pipeline, "transformer", None) is not None else getattr(
            pipeline, "transformer_2", None)
        return isinstance(pipeline, (WanPipeline, WanImageToVideoPipeline)) and isinstance(denoiser, WanTransformer3DModel)

    @classmethod
    def from_pipe(cls, pipeline: Any) -> WanFamily:
        source = getattr(pipeline, "name_or_path", None) or getattr(pipeline.config, "_name_or_path", None) or type(pipeline).__name__
        text = None
        if pipeline.text_encoder is not None:
            text = WanPipeline(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, vae=None, scheduler=None)
        first, second = pipeline.transformer, pipeline.transformer_2
        if first is None:  # Wan2.2 A14B saved with its low-noise expert only
            first, second = second, None
        mode, why = transformer_image_mode(first.config.in_channels, first.config.out_channels,
                                           bool(pipeline.config.expand_timesteps), pipeline.vae.config.z_dim,
                                           pipeline.vae.config.scale_factor_temporal)
        if mode is None and (why or isinstance(pipeline, WanImageToVideoPipeline)):  # as detect() judges a folder
            raise ValueError(f"{type(pipeline).__name__}: {why or NO_IMAGE}")
        encoder = getattr(pipeline, "image_encoder", None)
        embed_shape = None
        if encoder is not None:
            vision = encoder.config
            embed_shape = (clip_image_tokens(vision.image_size, vision.patch_size), vision.hidden_size)
        return cls(
            transformer=first,
            transformer_2=second,
            vae=pipeline.vae,
            # a pipeline built in memory has no _class_name in its scheduler's config: the object says it
            scheduler_config={**pipeline.scheduler.config, "_class_name": type(pipeline.scheduler).__name__},
            boundary_ratio=pipeline.config.boundary_ratio,
            expand_timesteps=bool(pipeline.config.expand_timesteps),
            source=str(source),
            text_pipeline=text,
            text_dtype=first.dtype,
            image_mode=mode,
            image_encoder=encoder,
            image_processor=getattr(pipeline, "image_processor", None) if encoder is not None else None,
            image_embed_shape=embed_shape,
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
        return (self.transformer.config.out_channels, height // scale, width // scale)

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

    # ---- images (image-to-video: WanImageToVideoPipeline's four modes)
    @property
    def takes_last_image(self) -> bool:
        """Whether the model takes an end image: mask-and-latents models do; a CLIP-conditioned one
        only with a position embedding for two images' embeddings (first-last-frame models)."""
        if self.image_mode != "concat":
            return False
        return self.image_embed_shape is None or self.transformer.config.pos_embed_seq_len is not None

    def check_images(self, inputs: ImageInputs, num_frames: int) -> None:
        """One-line refusals of images this model cannot take (the rules the pre-flight applies to a folder)."""
        facts = FolderFacts(family="wan", temporal_compression=self.vae.config.scale_factor_temporal,
                            image_mode=self.image_mode, image_required=self.image_mode == "concat",
                            last_image=self.takes_last_image)
        given = {name for name in ("image", "last_image", "video") if getattr(inputs, name) is not None}
        problem = facts.image_problem(self.source, given, None if inputs.video is None else video_length(inputs.video),
                                      num_frames)
        if problem is not None:
            raise ValueError(problem)

    def _clip_embeddings(self, images: list[Any], ctx: ClipContext) -> torch.Tensor:
        """CLIP's penultimate hidden states of ``images`` (len(images), tokens, width), as
        ``WanImageToVideoPipeline.encode_image``: rank 0 encodes, the others receive them."""

        def encode() -> torch.Tensor:
            if self.image_encoder is None:
                from transformers import CLIPImageProcessor, CLIPVisionModel

                logger.info("loading the image encoder from %s", self.source)
                self.image_encoder = CLIPVisionModel.from_pretrained(self.source, subfolder="image_encoder")
                self.image_encoder.eval().requires_grad_(False)
                self.image_processor = CLIPImageProcessor.from_pretrained(self.source, subfolder="image_processor")
                self.image_between_encodes = torch.device("cpu")
            if self.image_between_encodes is not None:
                self.image_encoder.to(self.device)
            try:
                device = next(self.image_encoder.parameters()).device
                pixels = self.image_processor(images=images if len(images) > 1 else images[0], return_tensors="pt")
                with torch.no_grad():
                    return self.image_encoder(**pixels.to(device), output_hidden_states=True).hidden_states[-2]
            finally:
                if self.image_between_encodes is not None:  # off the GPU between calls, as the text encoder
                    self.image_encoder.to(self.image_between_encodes)

        shape = (len(images), *self.image_embed_shape)
        dtype = self.image_encoder.dtype if self.image_encoder is not None else torch.float32
        return broadcast_from_rank0(ctx, encode, shape, dtype, self.device)

    def condition_on_images(self, cond: Conditioning, inputs: ImageInputs, ctx: ClipContext, num_frames: int,
                            height: int, width: int) -> Conditioning:
        """``cond`` with this rank's image conditioning, as ``WanImageToVideoPipeline`` prepares it for
        the whole video but for the rank's latent frames only.

        The condition video (the given first frames: ``image`` or ``video``; zeros; ``last_image`` last)
        is VAE-encoded here in parallel: each rank encodes the chunks of its own latent frames after a
        warm-up on the preceding ones as long as the causal encoder's receptive field
        (:func:`~.vae.encode_wan_frames`), so no rank encodes the whole video and every latent equals
        ``vae.encode`` of the whole condition video. CLIP embeddings (Wan2.1 I2V) come from rank 0."""
        from diffusers.video_processor import VideoProcessor

        if not inputs:
            return cond
        processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        if inputs.video is not None:
            given = processor.preprocess_video(inputs.video, height=height, width=width).to(torch.float32)
        else:
            given = processor.preprocess(inputs.image, height=height, width=width).to(torch.float32)[:, :, None]
        last = None
        if inputs.last_image is not None:
            last = processor.preprocess(inputs.last_image, height=height, width=width).to(torch.float32)[:, :, None]
        n_given = given.shape[2]
        owned, step = ctx.frames, self.vae.config.scale_factor_temporal
        vae_device, vae_dtype = self.vae.device, self.vae.dtype
        extra = dict(cond.extra)

        def condition_frames(frames: range) -> torch.Tensor:
            zeros = given.new_zeros(given.shape[:2] + (1,) + given.shape[3:])
            parts = [given[:, :, f : f + 1] if f < n_given else last if last is not None and f == num_frames - 1
                     else zeros for f in frames]
            return torch.cat(parts, dim=2).to(vae_device, vae_dtype)

        if self.image_mode == "first_frame":
            # The given frames' own latents replace the first latent frames (timestep 0 on their tokens).
            given_latents = self.latent_frames(n_given)
            mine = range(owned.start, min(owned.stop, given_latents))
            extra["given_frames"] = len(mine)
            if mine:
                extra["given_latents"] = normalize_wan_latents(self.vae, wan_vae.encode_wan_frames(self.vae, condition_frames, mine).to(self.device))
            return Conditioning(cond.prompt_embeds, cond.negative_embeds, cond.guidance_scale, extra)

        # "concat": mask (1 on given video frames; the first frame counts 4x) and the condition video's latents
        mask = [1.0 if f < n_given or (last is not None and f == num_frames - 1) else 0.0 for f in range(num_frames)]
        latent_mask = [[mask[0]] * step if i == 0 else mask[step * i - step + 1 : step * i + 1] for i in owned]
        _, h, w = self.latent_shape(height, width)
        mask_tensor = torch.tensor(latent_mask, dtype=torch.float32, device=self.device).T  # (step, frames)
        mask_tensor = mask_tensor[None, :, :, None, None].expand(1, step, len(owned), h, w)
        latents = normalize_wan_latents(self.vae, wan_vae.encode_wan_frames(self.vae, condition_frames, owned).to(self.device))
        extra["condition"] = torch.cat([mask_tensor, latents], dim=1)
        if self.image_embed_shape is not None:
            images = [inputs.image if inputs.image is not None else inputs.video[0]]
            if last is not None:
                images.append(inputs.last_image)
            extra["image_embeds"] = self._clip_embeddings(images, ctx)
        return Conditioning(cond.prompt_embeds, cond.negative_embeds, cond.guidance_scale, extra)

    def finish_latents(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoised latents as decoded: Wan2.2 TI2V puts the given frames' latents back in place."""
        given = cond.extra.get("given_frames", 0)
        if not given:
            return latents
        latents = latents.clone()
        latents[:, :, :given] = cond.extra["given_latents"].to(latents.dtype)
        return latents

    # ---- one step
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """WanPipeline's step: the high-noise expert (and ``guidance_scale``) while ``timestep`` >= the
        boundary, else the low-noise one (and ``guidance_scale_2``); conditional and unconditional passes.
        Image-to-video as WanImageToVideoPipeline: the mask and image latents concatenated to the input
        and the CLIP embeddings beside the text, or (TI2V) the given latent frames in place with
        timestep 0 on their tokens."""
        boundary = None if self.boundary_ratio is None else self.boundary_ratio * self.scheduler_config["num_train_timesteps"]
        high_noise = boundary is None or self.transformer_2 is None or timestep >= boundary
        model = self.transformer if high_noise else self.transformer_2
        scale = cond.guidance_scale if high_noise else cond.extra["guidance_scale_2"]
        given = cond.extra.get("given_frames", 0)
        if "condition" in cond.extra:
            x = torch.cat([latents, cond.extra["condition"]], dim=1).to(model.dtype)
        elif given:
            x = self.finish_latents(latents, cond).to(model.dtype)
        else:
            x = latents.to(model.dtype)
        if self.expand_timesteps:  # Wan2.2 TI2V: one timestep per token (0 on given frames)
            _, patch_h, patch_w = model.config.patch_size
            per_frame = (x.shape[3] // patch_h) * (x.shape[4] // patch_w)
            if given:
                frame_mask = torch.ones(x.shape[2], dtype=torch.float32, device=x.device)
                frame_mask[:given] = 0
                t = (frame_mask * timestep).repeat_interleave(per_frame)[None].expand(x.shape[0], -1)
            else:
                t = timestep.expand(x.shape[0], x.shape[2] * per_frame)
        else:
            t = timestep.expand(x.shape[0])
        image = cond.extra.get("image_embeds")
        if image is not None:
            image = image.to(model.dtype)
        pred = model(x, t, cond.prompt_embeds, image, return_dict=False)[0]
        if cond.negative_embeds is None:
            return pred
        uncond = model(x, t, cond.negative_embeds, image, return_dict=False)[0]
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
