"""Samplers by name, built on the model's own noise schedule (diffusers schedulers)."""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

SchedulerName = Literal["model", "ddim", "dpmsolver++", "dpmsolver++-karras", "sde-dpmsolver++", "sde-dpmsolver++-karras"]
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)


def make_scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """The scheduler called ``name`` (one of ``SCHEDULER_NAMES``) on ``scheduler_config``'s noise schedule;
    ``"model"`` is the class and settings the model folder ships (e.g. Wan's flow-matching UniPC with
    its ``flow_shift``)."""
    import diffusers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler: unknown name {name!r} (use one of {', '.join(SCHEDULER_NAMES)}, "
                         "or pass a diffusers scheduler object)")
    if name == "model":
        class_name = scheduler_config.get("_class_name")
        scheduler_class = getattr(diffusers, str(class_name), None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"scheduler: the model's scheduler {class_name!r} is not a diffusers scheduler; "
                             "choose a named one")
        return scheduler_class.from_config(scheduler_config)
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    algorithm = name.removesuffix("-karras")
    karras = name.endswith("-karras")
    if karras and scheduler_config.get("rescale_betas_zero_snr"):
        # Zero terminal SNR makes sigma_max ~4096: Karras spacing would then put every step at
        # t ~ 999 (999, 998, 998, ...), i.e. the video would never be denoised.
        logger.warning("scheduler %s: this model has a zero-terminal-SNR schedule, on which Karras sigmas "
                       "put every step at t ~ 999; using its own timestep spacing (%s)", name, algorithm)
        karras = False
    return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type=algorithm, use_karras_sigmas=karras)
