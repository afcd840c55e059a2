"""Checkpoints of a running generation: resume after a crash, a kill or Ctrl-C.

A checkpoint is one file, ``<base_path>/<file_name>.ckpt`` (a ``torch.save`` archive, loaded with
``weights_only=True``), replaced atomically every ``pipe_configs.checkpoint_every`` denoising steps.
It holds the whole video's latents (gathered on rank 0), the scheduler's state with every tensor of
latent shape gathered along the frame axis (so a run with another number of ranks can take its own
frames), the number of steps done, and a hash of everything that determines the result: the model's
files, seed, prompts, sizes, steps, scheduler and engine knobs, the number of frames. Not the
devices, the world size or the output folder: those may change between the two runs.

This module imports torch only when a checkpoint is read or written, so the launcher stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_output
from ..errors import CheckpointError, describe_exception
from .config import REQUEST_KEYS, RunConfig

if TYPE_CHECKING:
    import torch

FORMAT = "video-infinity-checkpoint"
VERSION = 2  # 2: the result's parts are the generation request's fields (1: a hand-picked list of keys)
SUFFIX = ".ckpt"
_HEAD_BYTES = 1 << 20  # bytes hashed at each end of a large weight file
_PER_LATENT = "__per_latent__"


# --------------------------------------------------------------------------------------------------
# What determines the result


def model_fingerprint(model: str | None) -> str | None:
    """A hash of a local model folder's files (configs in full, weights by size and both ends).

    Cheap even for multi-GB checkpoints, and independent of where the folder lives. A hub id that is
    not a local folder is identified by its name.
    """
    if model is None:
        return None
    root = Path(model).expanduser()
    if not root.is_dir():
        return f"id:{model}"
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .cache/, .gitattributes, editor files: not part of the model
        size = path.stat().st_size
        digest.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if size <= 2 * _HEAD_BYTES:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_HEAD_BYTES))
                fh.seek(size - _HEAD_BYTES)
                digest.update(fh.read(_HEAD_BYTES))
    return digest.hexdigest()


def result_parts(config: RunConfig, model: str, world_size: int, dtype: str) -> dict[str, Any]:
    """The parts of a run that determine its latents: the model's files, the compute dtype actually
    used (``dtype``) and every field of the generation request (its length on ``world_size`` ranks)."""
    request = config.request.model_copy(update={"num_frames": config.pipe_configs.total_frames_for(world_size)})
    parts = {
        "model": model_fingerprint(model),
        "base_model": model_fingerprint(config.base_model),
        "dtype": dtype,
        # Under the config file's keys: what a refused resume names is what the user would change.
        **{REQUEST_KEYS[name]: value for name, value in request.model_dump(mode="json").items()},
    }
    if config.motion_adapter is not None:
        parts["motion_adapter"] = model_fingerprint(config.motion_adapter)
    return parts


def hash_parts(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CheckpointPlan:
    """What a run does about checkpoints: where it saves, how often, what it resumes from."""

    path: Path
    """Where this run saves (``<base_path>/<file_name>.ckpt``); removed once the video is written."""
    every: int | None
    """Save after every ``every`` denoising steps; None: never."""
    parts: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    resume: Path | None = None
    """The checkpoint to continue from, already checked against ``config_hash``."""


# --------------------------------------------------------------------------------------------------
# Scheduler state


def split_scheduler_state(scheduler: Any, latent_shape: tuple[int, ...]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The scheduler's state as (plain values, tensors of latent shape), in a fixed order.

    Tensors shaped like this rank's latents (e.g. DPM-Solver's ``model_outputs``) are taken out and
    replaced by a placeholder; the caller gathers them along the frame axis (dim 2).
    """
    import torch

    per_latent: list[torch.Tensor] = []

    def convert(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if tuple(value.shape) == tuple(latent_shape):
                per_latent.append(value)
                return {_PER_LATENT: len(per_latent) - 1}
            return value.detach().cpu().clone()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [convert(name, item) for item in value]
        raise CheckpointError(f"cannot checkpoint the scheduler {type(scheduler).__name__}: its attribute "
                              f"{name!r} is a {type(value).__name__}")

    state = {key: convert(key, value) for key, value in vars(scheduler).items() if key != "_internal_dict"}
    return state, per_latent


def restore_scheduler_state(scheduler: Any, state: dict[str, Any], per_latent: list[torch.Tensor],
                            device: torch.device) -> None:
    """Put a state from :func:`split_scheduler_state` back (``per_latent``: this rank's slices)."""
    import torch

    def convert(value: Any) -> Any:
        if isinstance(value, dict) and _PER_LATENT in value:
            return per_latent[value[_PER_LATENT]].to(device)
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, list):
            return [convert(item) for item in value]
        return value

    for key, value in state.items():
        current = getattr(scheduler, key, None)
        restored = convert(value)
        if isinstance(current, torch.Tensor) and isinstance(restored, torch.Tensor):
            restored = restored.to(current.device)  # keep the scheduler's own placement (e.g. sigmas on CPU)
        setattr(scheduler, key, restored)


# --------------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: Path, *, latents: torch.Tensor, scheduler_state: dict[str, Any],
                    scheduler_tensors: list[torch.Tensor], step: int, num_steps: int, plan: CheckpointPlan,
                    file_stem: str, world_size: int) -> None:
    """Write a checkpoint atomically (:func:`video_infinity.atomic.atomic_output`)."""
    import torch

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config_hash": plan.config_hash,
        "parts": json.dumps(plan.parts, sort_keys=True),
        "step": step,
        "num_steps": num_steps,
        "file_stem": file_stem,
        "world_size": world_size,
        "latents": latents.detach().cpu().contiguous(),
        "scheduler": scheduler_state,
        "scheduler_tensors": [t.detach().cpu().contiguous() for t in scheduler_tensors],
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (tensors memory-mapped); CheckpointError if it is not a usable one."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save archives are zip files
        raise CheckpointError(f"--resume {path}: not a video-infinity checkpoint (not a torch.save archive; "
                              "truncated or another kind of file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, not ours: one line
        raise CheckpointError(f"--resume {path}: not a readable checkpoint ({describe_exception(exc, 200)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not a video-infinity checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"--resume {path}: checkpoint format version {data.get('version')} is not supported "
                              f"(this version reads {VERSION})")
    return data


def check_compatible(data: dict[str, Any], path: Path, plan: CheckpointPlan) -> None:
    """Refuse a checkpoint made with another config or model, naming what differs."""
    if data.get("config_hash") == plan.config_hash:
        return
    try:
        saved = json.loads(data.get("parts", "{}"))
    except ValueError:
        saved = {}
    differ = [key for key in plan.parts if saved.get(key) != plan.parts[key]] or ["unknown"]
    raise CheckpointError(
        f"--resume {path}: the checkpoint was made with a different config or model (differs in: "
        f"{', '.join(differ)}); resume with the config it was made with, or start a new run without --resume"
    )


def estimate_bytes(latent_bytes: int, history: int) -> int:
    """Disk for one checkpoint (the latents and ``history`` latent-sized scheduler tensors) plus the
    temporary copy written beside it before the rename."""
    return 2 * (1 + history) * latent_bytes
