"""The sampling loop (the only one in the package), with rank-independent noise.

``sample`` runs any family's model call (:meth:`ModelFamily.predict_noise`) through a diffusers
scheduler; :class:`~video_infinity.pipeline.VideoInfinityPipeline` and through it the CLI, the demo
evaluation and training samples, and the benchmarks use it. ``denoise`` is the same loop for a bare
UNet3D (tests and engine benchmarks that have no text encoder or VAE).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .noise import INITIAL, frame_noise

StepEnd = Callable[[int, torch.Tensor, torch.Tensor, Any], "torch.Tensor | None"]
"""``on_step_end(index, timestep, latents, scheduler)``: may return replacement latents; see ``sample``."""


class StopSampling(Exception):
    """Raised by an ``on_step_end`` callback to end the loop early with the current latents, or
    with ``latents`` when given."""

    def __init__(self, latents: torch.Tensor | None = None) -> None:
        super().__init__("sampling stopped")
        self.latents = latents


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


def sample(
    predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Any,
    latents: torch.Tensor,
    *,
    seed: int,
    frames: range,
    num_steps: int,
    eta: float = 0.0,
    start_step: int = 0,
    restore_scheduler: Callable[[Any], None] | None = None,
    on_step_end: StepEnd | None = None,
    on_step_start: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (batch, C, frames, H, W) holding global (latent) frames ``frames``.

    ``predict_noise(model_input, t)`` is the guided model output for the scaled input. Noise that a
    stochastic scheduler adds at step i is drawn per frame from (seed, i + 1, frame), so the result
    does not depend on how frames are split over ranks.

    Resuming: ``latents`` are those after ``start_step`` steps, and ``restore_scheduler(scheduler)``,
    called right after ``set_timesteps``, puts back the scheduler's state at that point. After each
    step ``on_step_end(i, t, latents, scheduler)`` runs; it may return new latents, or raise
    :class:`StopSampling` to end the loop with the current latents. ``on_step_start(i)`` runs before
    step i's model calls (the engine's step index: ``ParallelHandle.set_step``; a resumed loop
    starts at ``start_step``, as the uninterrupted one reached it).
    """
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps}], got {start_step}")
    scheduler.set_timesteps(num_steps, device=latents.device)
    if restore_scheduler is not None:
        restore_scheduler(scheduler)
    batch, channels, _, height, width = latents.shape
    adds_noise = _adds_noise(scheduler, eta)
    takes_eta = _step_accepts(scheduler, "eta")
    for index, t in enumerate(scheduler.timesteps):
        if index < start_step:
            continue
        if on_step_start is not None:
            on_step_start(index)
        noise_pred = predict_noise(scheduler.scale_model_input(latents, t), t)
        step_kwargs: dict[str, Any] = {}
        if adds_noise:
            step_kwargs["variance_noise"] = frame_noise(
                seed, frames, (batch, channels, height, width), INITIAL + 1 + index, latents.dtype, latents.device
            )
        if takes_eta:
            step_kwargs["eta"] = eta
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        if on_step_end is not None:
            try:
                replaced = on_step_end(index, t, latents, scheduler)
            except StopSampling as stop:
                if stop.latents is not None:
                    latents = stop.latents
                break
            if replaced is not None:
                latents = replaced
    return latents

