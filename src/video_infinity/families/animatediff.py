"""AnimateDiff (Stable Diffusion 1.5 + a motion adapter, diffusers ``UNetMotionModel``): loading,
per-frame prompts, decoding, and one rank's sampling loop with the engine.

Loading goes through diffusers' own ``AnimateDiffPipeline`` (which turns an SD UNet plus a
``MotionAdapter`` into a ``UNetMotionModel`` with ``UNetMotionModel.from_unet2d``), from either

* a saved AnimateDiff pipeline folder (``model_index.json`` of ``AnimateDiffPipeline``), or
* a Stable Diffusion 1.5 pipeline folder (``model``) plus a motion adapter folder (``motion_adapter``).

Prompts, one embedding per frame of the whole video (AnimateDiff's UNet takes one per frame):

* a string: every frame;
* a list: consecutive segments of (nearly) equal length, blended over ``transition_frames`` at the
  borders (the project's multi-prompt rule, :mod:`video_infinity.prompts`);
* a ``{frame: prompt}`` dict: FreeNoise's rule (diffusers ``enable_free_noise``): keyframes, frame 0
  required; frames between two keyframes interpolate their embeddings linearly, frames after the last
  keyframe keep it. So FreeNoise users' prompt dicts give the same conditioning here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import EngineConfig
from ..context import ClipContext
from ..denoise import denoise, initial_latents
from ..engine.motion import MotionConfig, parallelize_motion
from ..prompts import FrameMix, frame_embeddings, frame_prompt_mix, unique_prompts

logger = logging.getLogger(__name__)

__all__ = [
    "PromptSpec",
    "decode_frames",
    "encode_frame_prompts",
    "frame_prompt_plan",
    "is_animatediff_folder",
    "load_animatediff",
    "sample_on_rank",
]

PromptSpec = str | list[str] | Mapping[int, str]
"""One prompt, a list spread over the video, or FreeNoise-style ``{frame: prompt}`` keyframes."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_animatediff_folder(model: str | Path) -> bool:
    """Whether ``model`` is a local AnimateDiff pipeline folder (its ``model_index.json`` or its UNet's
    config says so). Config files only, no weights read."""
    folder = Path(model)
    index = _read_json(folder / "model_index.json")
    if str(index.get("_class_name", "")).startswith("AnimateDiff"):
        return True
    return _read_json(folder / "unet" / "config.json").get("_class_name") == "UNetMotionModel"


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


def frame_prompt_plan(prompts: PromptSpec, total_frames: int, transition_frames: int = 0) -> tuple[list[str], list[FrameMix]]:
    """Distinct prompts and, per frame of the whole video, which of them (or blend of two) it follows."""
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Mapping):
        return _keyframe_plan(prompts, total_frames)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts: give a non-empty string, a list of non-empty strings or a {frame: prompt} dict")
    distinct, index = unique_prompts(list(prompts))
    mixes = [FrameMix(index[m.first], index[m.second], m.weight)
             for m in frame_prompt_mix(total_frames, len(prompts), transition_frames)]
    return distinct, mixes


def _keyframe_plan(keyframes: Mapping[int, str], total_frames: int) -> tuple[list[str], list[FrameMix]]:
    """FreeNoise's rule (``AnimateDiffFreeNoiseMixin._encode_prompt_free_noise`` with its linear
    interpolation): between keyframes a and b, frame f blends them with weight (f - a) / (b - a)."""
    if not keyframes:
        raise ValueError("prompts: the {frame: prompt} dict is empty")
    for frame, prompt in keyframes.items():
        if not isinstance(frame, int) or isinstance(frame, bool) or not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompts: keys must be frame numbers and values non-empty strings, got {frame!r}: {prompt!r}")
    frames = sorted(keyframes)
    if frames[0] != 0:
        raise ValueError("prompts: the {frame: prompt} dict needs a prompt at frame 0")
    if frames[-1] >= total_frames:
        raise ValueError(f"prompts: keyframe {frames[-1]} is past the video's last frame ({total_frames - 1})")
    distinct, index = unique_prompts([keyframes[f] for f in frames])
    mixes = []
    segment = 0
    for frame in range(total_frames):
        while segment + 1 < len(frames) and frame >= frames[segment + 1]:
            segment += 1
        if segment + 1 < len(frames):
            start, stop = frames[segment], frames[segment + 1]
            mixes.append(FrameMix(index[segment], index[segment + 1], (frame - start) / (stop - start)))
        else:
            mixes.append(FrameMix(index[segment], index[segment], 0.0))
    return distinct, mixes


def _encode(pipe: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds


def encode_frame_prompts(pipe: Any, prompts: PromptSpec, total_frames: int, frames: range, *,
                         negative_prompt: PromptSpec | None = None, guidance_scale: float = 7.5,
                         transition_frames: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positive, negative) text embeddings of ``frames`` (global indices): positive (1, len(frames), seq, dim);
    negative the same, or (1, seq, dim) for the empty prompt, or None when ``guidance_scale <= 1``. Distinct prompts are encoded once, with the pipeline's
    own ``encode_prompt`` (so LoRA scales, clip skip defaults and textual inversions apply as in diffusers)."""
    device = pipe.unet.device
    distinct, mixes = frame_prompt_plan(prompts, total_frames, transition_frames)
    wanted = mixes[frames.start : frames.stop]
    positive = frame_embeddings(_encode(pipe, distinct, device), wanted).unsqueeze(0)
    if guidance_scale <= 1.0:
        return positive, None
    if not negative_prompt:  # diffusers' unconditional embedding: the empty prompt, every frame
        return positive, _encode(pipe, [""], device)
    negative_distinct, negative_mixes = frame_prompt_plan(negative_prompt, total_frames, transition_frames)
    negative = frame_embeddings(_encode(pipe, negative_distinct, device), negative_mixes[frames.start : frames.stop])
    return positive, negative.unsqueeze(0)


def decode_frames(pipe: Any, latents: torch.Tensor, chunk_frames: int = 1) -> torch.Tensor:
    """A rank's latents (1, C, f, h, w) as float frames (f, H, W, 3) in [0, 1].

    AnimateDiff's VAE is an image VAE: frames decode independently. ``chunk_frames`` frames go through
    it at once; 1 (the default) makes every frame's pixels independent of its clip (convolution
    algorithms depend on the batch size), as split-invariant runs need.
    """
    video = pipe.decode_latents(latents, decode_chunk_size=chunk_frames)  # (1, 3, f, H, W) in [-1, 1]
    return (video[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1)


def sample_on_rank(
    pipe: Any,
    prompts: PromptSpec,
    *,
    total_frames: int,
    context: ClipContext | None = None,
    engine_config: EngineConfig | dict | None = None,
    motion: MotionConfig | dict | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: PromptSpec | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    transition_frames: int = 0,
    decode: bool = False,
) -> torch.Tensor:
    """Denoise this rank's clip of one long AnimateDiff video with the engine attached.

    Every rank calls this with the same arguments but its own ``context`` (None: one process, all
    frames). Returns the clip's latents (1, C, frames, h, w), or with ``decode`` its frames
    (frames, H, W, 3) in [0, 1]. Uses ``pipe.scheduler``; noise is drawn per frame, so the video does
    not depend on the number of ranks.
    """
    context = context or ClipContext(total_frames=total_frames)
    if context.total_frames != total_frames:
        raise ValueError(f"context.total_frames ({context.total_frames}) != total_frames ({total_frames})")
    config = engine_config if isinstance(engine_config, EngineConfig) else EngineConfig.model_validate(engine_config or {})
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of {scale}, got {height}x{width}")
    frames = context.frames
    positive, negative = encode_frame_prompts(pipe, prompts, total_frames, frames, negative_prompt=negative_prompt,
                                              guidance_scale=guidance_scale, transition_frames=transition_frames)
    latents = initial_latents(seed, frames, (1, unet.config.in_channels, height // scale, width // scale),
                              pipe.scheduler.init_noise_sigma, unet.dtype, unet.device)
    handle = parallelize_motion(unet, config, context, motion)
    try:
        with torch.no_grad():
            latents = denoise(unet, pipe.scheduler, latents, positive, negative_embeds=negative, seed=seed,
                              frames=frames, num_steps=num_inference_steps, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    if not decode:
        return latents
    with torch.no_grad():
        return decode_frames(pipe, latents)
