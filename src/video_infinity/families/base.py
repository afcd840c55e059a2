"""The protocol every model family implements (see ``families/__init__.py`` for how they are chosen).

Frames: the pipeline speaks in *video* frames (what the user asks for) and the engine in *latent*
frames (the model's time axis); ``latent_frames`` / ``video_frames`` convert (equal for UNet3D,
~4x apart for Wan). A rank owns a contiguous range of latent frames (its ``ClipContext``).

Tensors: latents are ``(batch, channels, latent frames, h, w)``; text embeddings per frame are
``(frames, seq, dim)``; decoded frames are float ``(n, height, width, 3)`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ..context import ClipContext


@dataclass
class Conditioning:
    """What one rank's model call is conditioned on, prepared once per generation."""

    prompt_embeds: torch.Tensor
    """Positive text: (1, seq, dim) when every frame has the same, else (1, frames, seq, dim)."""
    negative_embeds: torch.Tensor | None
    """Negative text (1, seq, dim) for classifier-free guidance, or None without guidance."""
    guidance_scale: float
    """Classifier-free guidance scale; <= 1 runs the conditional pass only (diffusers' rule)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific settings of the model call (e.g. ``fps`` for VideoCrafter2, the second
    expert's guidance scale for Wan2.2 A14B)."""


@dataclass
class ImageInputs:
    """A request's images, read (PIL images, arrays or tensors, as diffusers' pipelines take them):
    the first frame, the last frame, and the given first frames of a continuation."""

    image: Any = None
    last_image: Any = None
    video: Any = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.image, self.last_image, self.video))


class ModelFamily(Protocol):
    """One kind of text-to-video model, loaded: its components and how the pipeline drives them."""

    name: ClassVar[str]
    """Short name, e.g. ``"unet3d"``."""
    model: nn.Module
    """The denoiser (UNet, transformer; for two-expert models the first)."""
    denoisers: tuple[nn.Module, ...]
    """Every denoiser a step may call; the engine parallelizes each (Wan2.2 A14B has two experts)."""
    source: str
    """Where it was loaded from (for sidecars and logs)."""

    # ---- finding and loading --------------------------------------------------------------------
    @classmethod
    def load(cls, model: str, base_model: str | None, torch_dtype: torch.dtype, device: torch.device) -> ModelFamily:
        """Load every component, in eval mode, on ``device``."""
    @classmethod
    def can_take(cls, pipeline: Any) -> bool:
        """Whether a loaded diffusers pipeline is of this family."""
    @classmethod
    def from_pipe(cls, pipeline: Any) -> ModelFamily:
        """Reuse a loaded diffusers pipeline's components (no copy)."""

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the latents the sampling loop carries."""
    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (the VAE's downsampling)."""
    def latent_frames(self, video_frames: int) -> int:
        """Latent frames for a video of ``video_frames`` frames (ValueError if impossible)."""
    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames."""
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """One latent frame's (channels, h, w)."""

    # ---- text, noise, model call, decode --------------------------------------------------------
    def encode_prompts(self, prompts: list[str], ctx: ClipContext | None = None) -> torch.Tensor:
        """Text embeddings (len(prompts), seq, dim) on the model's device, on every rank of ``ctx``
        (all ranks call it with the same prompts; a family may encode on rank 0 only and broadcast)."""
    def conditioning(self, frame_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, guidance_scale: float,
                     fps: int | None) -> Conditioning:
        """Prepare a rank's conditioning from its per-frame embeddings (frames, seq, dim)."""
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The guided model output for ``latents`` (already ``scale_model_input``-ed) at ``timestep``."""
    def decode(self, latents: torch.Tensor, split_invariant: bool, ctx: ClipContext | None = None) -> Iterator[torch.Tensor]:
        """A rank's latents (1, C, f, h, w) as float frames (n, H, W, 3) in [0, 1], chunk by chunk:
        the video frames of the rank's latent frames (all ranks call it together: a family whose
        decoder looks across clip borders exchanges latents over ``ctx``; None: one process).

        ``split_invariant``: a frame must decode to the same pixels whatever clip it belongs to."""

    # ---- sampling -------------------------------------------------------------------------------
    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The model's own noise schedule (a diffusers scheduler config)."""
    supports_loop: ClassVar[bool]
    """Whether the family's engine makes seamless loops (``EngineConfig.loop``)."""
    rotary_positions: ClassVar[bool]
    """Whether the family's temporal attention has rotary positions (``attn.rotary_clip`` applies)."""

    # ---- image-to-video (families whose ``image_mode`` is not None) ------------------------------
    image_mode: str | None
    """How the loaded model takes a start image (see ``FolderFacts.image_mode``); None: text only."""
    def check_images(self, inputs: ImageInputs, num_frames: int) -> None:
        """Refuse images this model cannot take (one-line ValueError naming the field), before model work."""
    def condition_on_images(self, cond: Conditioning, inputs: ImageInputs, ctx: ClipContext, num_frames: int,
                            height: int, width: int) -> Conditioning:
        """``cond`` with this rank's image conditioning (all ranks call it together)."""
    def finish_latents(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """This rank's denoised latents as they are decoded (given frames put back)."""
    default_scheduler: ClassVar[str]
    """Name of the sampler used when the caller gives none (see ``video_infinity.schedulers``;
    ``"model"`` is the model folder's own scheduler)."""
