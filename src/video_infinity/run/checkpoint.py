"""The command line's checkpoints: where a run saves (``<base_path>/<file_name>.ckpt``, every
``pipe_configs.checkpoint_every`` steps), what ``--resume`` continues from, and the pre-flight check
that a checkpoint belongs to this config and model, naming the config fields that differ.

The mechanism itself (file format, fingerprint, save, resume on any number of ranks) is the
pipeline's, in :mod:`video_infinity.checkpoint`; the ranks call it through
:class:`~video_infinity.pipeline.VideoInfinityPipeline`. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import fingerprint, mismatch, model_identity
from ..errors import CheckpointError
from .config import RunConfig

CONFIG_NAMES = {
    "prompt": "pipe_configs.prompts",
    "num_frames": "total frames",
    "num_inference_steps": "pipe_configs.steps",
    "engine": "plugin_configs",
}
"""Fingerprint parts (the Python call's argument names) as the config names them; the others are
``pipe_configs.<name>`` but for the top-level ``model``, ``base_model``, ``motion_adapter``,
``seed`` and ``dtype``."""
_TOP_LEVEL = {"model", "base_model", "motion_adapter", "seed", "dtype", "noise"}


@dataclass(frozen=True)
class CheckpointPlan:
    """What a run does about checkpoints: where it saves, how often, what it resumes from."""

    path: Path
    """Where this run saves (``<base_path>/<file_name>.ckpt``); removed once the video is written."""
    every: int | None
    """Save after every ``every`` denoising steps; None: never."""
    resume: Path | None = None
    """The checkpoint to continue from, already checked against this config."""


def config_fingerprint(config: RunConfig, model: str, world_size: int, dtype: str) -> dict[str, Any]:
    """The fingerprint the ranks' pipeline computes for this config (``model``: the resolved model
    folder, as the ranks load it; ``dtype``: the compute dtype actually used)."""
    pipe = config.pipe_configs
    return fingerprint(
        model=model_identity(model, config.base_model, config.motion_adapter), seed=config.seed, noise="seed",
        dtype=dtype, prompt=pipe.prompts, negative_prompt=pipe.negative_prompt,
        num_frames=pipe.total_frames_for(world_size), height=pipe.height, width=pipe.width,
        num_inference_steps=pipe.steps, guidance_scale=pipe.guidance_scale, fps=pipe.fps, eta=pipe.eta,
        transition_frames=pipe.transition_frames, keyframe_mode=pipe.keyframe_mode, scheduler=pipe.scheduler,
        engine=config.plugin_configs.model_dump(mode="json"))


def config_name(part: str) -> str:
    """A fingerprint part's name in the run config (``engine.attn.padding`` -> ``plugin_configs.attn.padding``)."""
    head, _, rest = part.partition(".")
    name = CONFIG_NAMES.get(head) or (head if head in _TOP_LEVEL else f"pipe_configs.{head}")
    return f"{name}.{rest}" if rest else name


def check_compatible(data: dict[str, Any], path: Path, parts: dict[str, Any]) -> None:
    """Refuse a checkpoint made with another config or model, naming the config fields that differ."""
    differ = mismatch(data, parts)
    if differ:
        raise CheckpointError(
            f"--resume {path}: the checkpoint was made with a different config or model (differs in: "
            f"{', '.join(dict.fromkeys(config_name(d) for d in differ))}); resume with the config it was made "
            "with, or start a new run without --resume"
        )
