"""The denoising loop over one rank's clip, with classifier-free guidance and rank-independent noise."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from .noise import INITIAL, frame_noise

logger = logging.getLogger(__name__)


def initial_latents(
    seed: int,
    frames: range,
    frame_shape: tuple[int, int, int, int],
    init_noise_sigma: float,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Initial latents of ``frames`` (batch, C, len(frames), H, W); frame f depends only on (seed, f)."""
    return frame_noise(seed, frames, frame_shape, INITIAL, torch.float32, "cpu").mul_(init_noise_sigma).to(device, dtype)


def _step_accepts(scheduler: Any, name: str) -> bool:
    return name in inspect.signature(scheduler.step).parameters


def _adds_noise(scheduler: Any, eta: float) -> bool:
    """Whether ``scheduler.step`` draws fresh noise (then we hand it per-frame noise instead)."""
    if not _step_accepts(scheduler, "variance_noise"):
        return False
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    if algorithm is not None:
        return str(algorithm).startswith("sde")
    if _step_accepts(scheduler, "eta"):
        return eta > 0
    return True


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
    on_step: Callable[[int, int], None] | None = None,
    start_step: int = 0,
    restore_scheduler: Callable[[Any], None] | None = None,
    after_step: Callable[[int, torch.Tensor, Any], None] | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (batch, C, frames, H, W) holding global frames ``frames``.

    ``prompt_embeds`` is (batch, seq, dim), or (batch, frames, seq, dim) for one embedding per frame
    (needs a UNet prepared by ``parallelize``). With ``guidance_scale > 1`` the unconditional and
    conditional passes run as one batch. Noise that a stochastic scheduler adds at step i is drawn
    per frame from (seed, i + 1, frame), so the result does not depend on how frames are split.

    Resuming: ``latents`` are those after ``start_step`` steps, and ``restore_scheduler(scheduler)``,
    called right after ``set_timesteps``, puts back the scheduler's state at that point; steps
    before ``start_step`` are skipped. ``after_step(i, latents, scheduler)`` runs after each step
    (e.g. to save a checkpoint).
    """
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps}], got {start_step}")
    guided = guidance_scale > 1.0
    if guided:
        if negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_embeds (the unconditional text embedding)")
        if negative_embeds.dim() < prompt_embeds.dim():
            negative_embeds = negative_embeds.unsqueeze(1).expand(-1, prompt_embeds.shape[1], -1, -1)
        text = torch.cat([negative_embeds, prompt_embeds])
    else:
        text = prompt_embeds
    scheduler.set_timesteps(num_steps, device=latents.device)
    if restore_scheduler is not None:
        restore_scheduler(scheduler)
    batch, channels, _, height, width = latents.shape
    adds_noise = _adds_noise(scheduler, eta)
    takes_eta = _step_accepts(scheduler, "eta")
    for index, t in enumerate(scheduler.timesteps):
        if index < start_step:
            continue
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = unet(model_input, t, encoder_hidden_states=text, **(unet_kwargs or {})).sample
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        step_kwargs: dict[str, Any] = {}
        if adds_noise:
            step_kwargs["variance_noise"] = frame_noise(
                seed, frames, (batch, channels, height, width), INITIAL + 1 + index, latents.dtype, latents.device
            )
        if takes_eta:
            step_kwargs["eta"] = eta
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        if on_step is not None:
            on_step(index, num_steps)
        if after_step is not None:
            after_step(index, latents, scheduler)
    return latents
