"""Checkpoints of a generation in progress: save the denoising state every N steps, continue it later
on any number of ranks, bit for bit.

The one mechanism behind ``VideoInfinityPipeline.__call__(checkpoint_dir=..., resume=True)`` and the
CLI's ``checkpoint_every`` / ``--resume`` (both go through
:meth:`~video_infinity.pipeline.VideoInfinityPipeline.generate_latents`).

A checkpoint is one file (a ``torch.save`` archive, read back with ``weights_only=True``), written by
rank 0 and replaced atomically (:func:`video_infinity.atomic.atomic_output`). It holds:

- ``format``, ``version``: :data:`FORMAT`, :data:`VERSION`;
- ``fingerprint`` (JSON text) and ``fingerprint_hash``: everything that determines the result, from
  :func:`fingerprint` (the model's files, seed, noise source, dtype, prompts, frames, size, steps,
  guidance, scheduler, engine settings); never the devices or the world size, which may change;
- ``step`` (denoising steps done), ``num_steps``, ``world_size`` (of the run that saved it);
- ``latents``: the whole video's latents, (batch, channels, latent frames, h, w), gathered on rank 0;
- ``scheduler``: the scheduler's plain state, and ``scheduler_tensors``: its tensors shaped like a
  rank's latents (e.g. DPM-Solver's model outputs), whole video along the frame axis too;
- ``extra``: the caller's notes (the CLI: the output file stem).

Everything per frame is stored per latent frame, so a run on W' ranks takes its own frames of a
checkpoint written on W ranks. This module imports torch only when a checkpoint is read or written,
so the command line's launcher stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_output
from .errors import CheckpointError, describe_exception

if TYPE_CHECKING:
    import torch

    from .context import ClipContext

logger = logging.getLogger(__name__)

FORMAT = "video-infinity-checkpoint"
VERSION = 2
"""Version 2: the fingerprint of the call (version 1 hashed the CLI's config fields)."""
SUFFIX = ".ckpt"
FILE_NAME = f"checkpoint{SUFFIX}"
"""The file a ``checkpoint_dir`` of the Python API holds."""
_HEAD_BYTES = 1 << 20  # bytes hashed at each end of a large weight file
_PER_LATENT = "__per_latent__"


# --------------------------------------------------------------------------------------------------
# What determines the result


def model_fingerprint(model: str | os.PathLike[str] | None) -> str | None:
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


def model_identity(model: str | os.PathLike[str], base_model: str | os.PathLike[str] | None = None,
                   motion_adapter: str | os.PathLike[str] | None = None) -> dict[str, str | None]:
    """The fingerprint parts naming the model, from the arguments of ``from_pretrained`` (the CLI
    passes its config's values there, so both compute the same parts)."""
    if motion_adapter is not None:
        base = base_model if base_model is not None else model
        return {"model": model_fingerprint(base), "motion_adapter": model_fingerprint(motion_adapter)}
    parts = {"model": model_fingerprint(model)}
    if base_model is not None:
        parts["base_model"] = model_fingerprint(base_model)
    return parts


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (dict keys as strings, tuples as lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint(*, model: Mapping[str, Any], seed: int, noise: str, dtype: str, prompt: Any,
                negative_prompt: str | None, num_frames: int, height: int, width: int, num_inference_steps: int,
                guidance_scale: float, fps: int | None, eta: float, transition_frames: int, keyframe_mode: str,
                scheduler: Any, engine: Mapping[str, Any]) -> dict[str, Any]:
    """What determines a generation's latents, keyed by the Python call's argument names.

    ``model``: from :func:`model_identity`; ``noise``: where the initial noise comes from (``"seed"``,
    ``"generator"`` or a hash of given latents); ``dtype``: the compute dtype actually used
    (``"float32"``); ``scheduler``: the name asked for (None: the family's default) or a
    ``{"class", "config"}`` description of a scheduler object; ``engine``: the engine settings as JSON.
    Values are normalised (an empty negative prompt is none, numbers as the pipeline uses them), so
    a call and a CLI config that make the same video give the same parts.
    """
    if isinstance(prompt, Mapping):
        prompt = {str(frame): text for frame, text in sorted(prompt.items())}
    elif not isinstance(prompt, str):
        prompt = list(prompt)
    parts = {
        **model,
        "seed": int(seed),
        "noise": noise,
        "dtype": dtype,
        "prompt": prompt,
        "negative_prompt": negative_prompt or None,
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "fps": fps,
        "eta": float(eta),
        "transition_frames": int(transition_frames),
        "keyframe_mode": keyframe_mode,
        "scheduler": scheduler,
        "engine": dict(engine),
    }
    return _plain(parts)


def fingerprint_hash(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the parts that differ (nested settings named down to the leaf:
    ``engine.attn.padding``)."""
    names = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "prompt":
            names += differences(a, b, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


@dataclass(frozen=True)
class CheckpointSpec:
    """Where and how often a generation saves its checkpoint, and what identifies it."""

    path: Path
    """The checkpoint file (written by rank 0, replaced at each save)."""
    every: int
    """Save after every ``every`` denoising steps (a stop by ``StopSampling`` keeps the last one)."""
    fingerprint: dict[str, Any]
    """From :func:`fingerprint`: what a resumed run must match."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Notes stored beside the state (the CLI: ``file_stem``); plain values only."""

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"checkpoint_every: must be a positive integer, got {self.every!r}")


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
                    scheduler_tensors: list[torch.Tensor], step: int, num_steps: int, parts: Mapping[str, Any],
                    world_size: int, extra: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint (whole-video tensors) atomically."""
    import torch

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint_hash": fingerprint_hash(parts),
        "fingerprint": json.dumps(parts, sort_keys=True),
        "step": step,
        "num_steps": num_steps,
        "world_size": world_size,
        "latents": latents.detach().cpu().contiguous(),
        "scheduler": scheduler_state,
        "scheduler_tensors": [t.detach().cpu().contiguous() for t in scheduler_tensors],
        "extra": dict(extra or {}),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str], label: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (tensors memory-mapped); CheckpointError if it is not a usable one.

    ``label`` starts the error messages (default: the path)."""
    import torch

    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise CheckpointError(f"{label}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save archives are zip files
        raise CheckpointError(f"{label}: not a video-infinity checkpoint (not a torch.save archive; "
                              "truncated or another kind of file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, not ours: one line
        raise CheckpointError(f"{label}: not a readable checkpoint ({describe_exception(exc, 200)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{label}: not a video-infinity checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{label}: checkpoint format version {data.get('version')} is not supported "
                              f"(this version reads {VERSION}; start the run again)")
    return data


def saved_fingerprint(data: Mapping[str, Any]) -> dict[str, Any]:
    try:
        saved = json.loads(data.get("fingerprint", "{}"))
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) else {}


def mismatch(data: Mapping[str, Any], parts: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint and a call ([] when it matches)."""
    if data.get("fingerprint_hash") == fingerprint_hash(parts):
        return []
    return differences(saved_fingerprint(data), parts) or ["unknown"]


def estimate_bytes(latent_bytes: int, history: int) -> int:
    """Disk for one checkpoint (the latents and ``history`` latent-sized scheduler tensors) plus the
    temporary copy written beside it before the rename."""
    return 2 * (1 + history) * latent_bytes


# --------------------------------------------------------------------------------------------------
# Across ranks: rank 0 reads and writes the file, every rank takes or gives its own frames


def agreed(compute: Callable[[], Any], ctx: ClipContext, device: torch.device) -> Any:
    """``compute()`` on rank 0, its result (or its CheckpointError) on every rank: the ranks decide
    together, and only rank 0 needs to see the checkpoint folder."""
    import torch.distributed as dist

    from .gather import comm_device

    if not ctx.distributed:
        return compute()
    box: list[Any] = [None]
    if ctx.rank == 0:
        try:
            box[0] = ("ok", compute())
        except CheckpointError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=ctx.global_rank(0), group=ctx.group, device=comm_device(ctx, device))
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


@dataclass
class ResumePoint:
    """This rank's part of a checkpoint: its latents after ``step`` steps and the scheduler's state."""

    step: int
    num_steps: int
    saved_world_size: int
    latents: torch.Tensor
    state: dict[str, Any]
    tensors: list[torch.Tensor]
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def take(cls, data: Mapping[str, Any], ctx: ClipContext, device: torch.device, dtype: torch.dtype) -> ResumePoint:
        """This rank's frames of a checkpoint's whole-video tensors."""
        own = slice(ctx.frames.start, ctx.frames.stop)
        latents = data["latents"][:, :, own].to(device=device, dtype=dtype).clone()
        tensors = [t[:, :, own].clone() for t in data["scheduler_tensors"]]
        return cls(int(data["step"]), int(data["num_steps"]), int(data.get("world_size") or 0), latents,
                   data["scheduler"], tensors, device, dict(data.get("extra") or {}))

    def restore(self, scheduler: Any) -> None:
        """``restore_scheduler`` of :func:`video_infinity.denoise.sample`."""
        restore_scheduler_state(scheduler, self.state, self.tensors, self.device)


def step_saver(spec: CheckpointSpec, ctx: ClipContext, device: torch.device,
               num_steps: int) -> Callable[[int, torch.Tensor, Any], None]:
    """``saver(index, latents, scheduler)``, called by every rank after step ``index``: every
    ``spec.every`` steps the ranks send their frames to rank 0, which writes the checkpoint."""
    import time

    from .gather import gather_frames

    def save(index: int, latents: torch.Tensor, scheduler: Any) -> None:
        done = index + 1
        if done % spec.every:
            return
        state, tensors = split_scheduler_state(scheduler, tuple(latents.shape))
        whole_latents = gather_frames(latents, ctx, device)
        whole_tensors = [gather_frames(t, ctx, device) for t in tensors]
        if whole_latents is None:  # not rank 0: its frames are sent
            return
        started = time.perf_counter()
        save_checkpoint(spec.path, latents=whole_latents, scheduler_state=state,
                        scheduler_tensors=whole_tensors, step=done, num_steps=num_steps,  # type: ignore[arg-type]
                        parts=spec.fingerprint, world_size=ctx.world_size, extra=spec.extra)
        logger.debug("checkpoint at step %d saved to %s in %.2f s", done, spec.path, time.perf_counter() - started)

    return save
