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
from .config import REQUEST_KEYS, RunConfig

_TOP_LEVEL = {"model", "base_model", "motion_adapter", "seed", "dtype", "noise"}
"""Fingerprint parts named at the config's top level; the request's fields go by ``REQUEST_KEYS``."""


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
    """The fingerprint the ranks' pipeline computes for this config's request (``model``: the
    resolved model folder, as the ranks load it; ``dtype``: the compute dtype actually used)."""
    request = config.request.model_copy(update={"num_frames": config.pipe_configs.total_frames_for(world_size)})
    return fingerprint(request, model=model_identity(model, config.base_model, config.motion_adapter),
                       seed=config.seed, noise="seed", dtype=dtype, scheduler=request.scheduler,
                       engine=request.engine_for(config.plugin_configs).model_dump(mode="json"))


def config_name(part: str) -> str:
    """A fingerprint part's name in the run config (``engine.attn.padding`` -> ``plugin_configs.attn.padding``)."""
    head, _, rest = part.partition(".")
    name = head if head in _TOP_LEVEL else REQUEST_KEYS.get(head, f"pipe_configs.{head}")
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
