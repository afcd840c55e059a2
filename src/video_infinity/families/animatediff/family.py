"""The AnimateDiff family: Stable Diffusion 1.5 + a motion adapter (diffusers ``UNetMotionModel``).

Loading goes through diffusers' own ``AnimateDiffPipeline`` (which turns an SD UNet plus a
``MotionAdapter`` into a ``UNetMotionModel`` with ``UNetMotionModel.from_unet2d``), from either

* a saved AnimateDiff pipeline folder (``model_index.json`` of ``AnimateDiffPipeline``), or
* a Stable Diffusion 1.5 pipeline folder (``model``) plus a motion adapter folder (``motion_adapter``).

Per-frame text: AnimateDiff's UNet takes one embedding per frame, so the pipeline's prompt lists
(segments) and FreeNoise-style ``{frame: prompt}`` dicts (keyframes, embeddings interpolated linearly
between them, as diffusers' ``enable_free_noise`` does) give each frame its own. Everything else
(the guided model call, frame-by-frame VAE decode) is the UNet3D family's: the same SD components.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...context import ClipContext
from ..unet3d.family import UNet3DFamily
from .detect import is_animatediff_folder, is_motion_adapter_folder

logger = logging.getLogger(__name__)

__all__ = ["AnimateDiffFamily", "is_animatediff_folder", "is_motion_adapter_folder", "load_animatediff"]


def load_animatediff(model: str | Path, motion_adapter: str | Path | None = None, *,
                     torch_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
    """An ``AnimateDiffPipeline`` (``.unet`` is a ``UNetMotionModel``) in eval mode on ``device``.

    ``model``: an AnimateDiff pipeline folder (``motion_adapter`` None), or a Stable Diffusion 1.5
    pipeline folder whose UNet gets the motion adapter at ``motion_adapter``.
    """
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel

    if motion_adapter is None:
        if not is_animatediff_folder(model):
            raise ValueError(
                f"model: {str(model)!r} is not an AnimateDiff pipeline folder; for a Stable Diffusion base "
                "also give motion_adapter (a MotionAdapter folder)"
            )
        pipe = AnimateDiffPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    else:
        if not (Path(motion_adapter) / "config.json").is_file():
            raise ValueError(f"motion_adapter: {str(motion_adapter)!r} has no config.json; give a MotionAdapter folder")
        adapter = MotionAdapter.from_pretrained(motion_adapter, torch_dtype=torch_dtype)
        pipe = AnimateDiffPipeline.from_pretrained(model, motion_adapter=adapter, torch_dtype=torch_dtype)
    if not isinstance(pipe.unet, UNetMotionModel):
        raise ValueError(f"model: {str(model)!r} did not load a UNetMotionModel (got {type(pipe.unet).__name__})")
    pipe.to(device)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.eval().requires_grad_(False)
    return pipe




@dataclass
class AnimateDiffFamily(UNet3DFamily):
    """Loaded components of an AnimateDiff model (see :class:`~video_infinity.families.ModelFamily`).

    The UNet3D family's model call, shapes and decode apply unchanged (SD components, one latent
    frame per video frame, per-frame text in ``(batch, frames, seq, dim)``, which the engine hands
    to the motion UNet in its own layout); text goes through diffusers' ``AnimateDiffPipeline.encode_prompt``.
    """

    name: ClassVar[str] = "animatediff"
    default_scheduler: ClassVar[str] = "ddim"  # AnimateDiff's published pipelines sample with DDIM
    supports_loop: ClassVar[bool] = False  # motion windows do not wrap around the video
    rotary_positions: ClassVar[bool] = False  # sinusoidal positions: no attn.rotary_clip
    image_mode: ClassVar[str | None] = None  # text to video only

    pipeline: Any = None
    """The diffusers ``AnimateDiffPipeline`` the components belong to (its ``encode_prompt``)."""

    # ---- finding and loading
    @classmethod
    def load(cls, model: str, base_model: str | None, torch_dtype: torch.dtype, device: torch.device) -> AnimateDiffFamily:
        if is_motion_adapter_folder(model) or (base_model is not None and not is_animatediff_folder(model)):
            if base_model is None:
                raise ValueError(f"base_model: {model!r} is a motion adapter; give the Stable Diffusion 1.5 "
                                 "pipeline it extends as base_model")
            return cls.load_with_adapter(base_model, model, torch_dtype, device)
        return cls.from_pipe(load_animatediff(model, torch_dtype=torch_dtype, device=device))

    @classmethod
    def load_with_adapter(cls, base_model: str, motion_adapter: str, torch_dtype: torch.dtype,
                          device: torch.device) -> AnimateDiffFamily:
        """A Stable Diffusion 1.5 pipeline folder with the ``MotionAdapter`` folder put on its UNet."""
        return cls.from_pipe(load_animatediff(base_model, motion_adapter, torch_dtype=torch_dtype, device=device))

    @classmethod
    def can_take(cls, pipeline: Any) -> bool:
        from diffusers import UNetMotionModel

        return isinstance(getattr(pipeline, "unet", None), UNetMotionModel)

    @classmethod
    def from_pipe(cls, pipeline: Any) -> AnimateDiffFamily:
        from diffusers.models.attention import FreeNoiseTransformerBlock

        if any(isinstance(m, FreeNoiseTransformerBlock) for m in pipeline.unet.modules()):
            raise ValueError("from_pipe: the pipeline has FreeNoise on; call pipeline.disable_free_noise() first")
        source = getattr(pipeline, "name_or_path", None) or getattr(pipeline.config, "_name_or_path", None) or type(pipeline).__name__
        return cls(pipeline.tokenizer, pipeline.text_encoder, pipeline.vae, pipeline.unet,
                   dict(pipeline.scheduler.config), False, str(source), pipeline)

    # ---- text
    def encode_prompts(self, prompts: list[str], ctx: ClipContext | None = None) -> torch.Tensor:
        """Text embeddings (len(prompts), seq, dim) by diffusers' own ``encode_prompt`` (LoRA scales,
        textual inversions and truncation warnings as in ``AnimateDiffPipeline``)."""
        with torch.no_grad():
            embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return embeds.to(self.unet.dtype)
