"""Pre-flight checks, once, before any rank starts: the model is one video-infinity runs (e.g. not an
image-to-video Wan folder), the output folder is writable and has room for the estimated outputs,
no output would replace a file the user did not ask to replace (and none is the config being run),
the model folder is complete and its files readable, a ``--resume`` checkpoint belongs to this
config and model. Each refusal is a one-line :class:`ConfigError` or
:class:`CheckpointError` (exit code 2). Imports neither torch nor diffusers (but for a checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..frames import latent_frame_count
from ..supported_models import unsupported_model
from ..checkpoint import estimate_bytes, load_checkpoint
from .checkpoint import CheckpointPlan, check_compatible, config_fingerprint
from .config import RunConfig
from .outputs import check_outputs, output_paths

logger = logging.getLogger(__name__)

def resolve_model(config: RunConfig) -> str:
    """The model folder or hub id (with a motion adapter: its Stable Diffusion base); without one,
    the embedded demo model."""
    if config.motion_adapter is not None:
        return config.model if config.model is not None else str(config.base_model)
    if config.model is not None:
        return config.model
    from ..demo import default_model_path

    return str(default_model_path())


# What each component subfolder of a pipeline folder must hold (as models.py checks it at load time).
_COMPONENT_FILES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "unet": [("config.json", ("config.json",)), ("weights", ("diffusion_pytorch_model*",))],
    "vae": [("config.json", ("config.json",)), ("weights", ("diffusion_pytorch_model*",))],
    "text_encoder": [("config.json", ("config.json",)), ("weights", ("model*.safetensors*", "pytorch_model*.bin*"))],
    "tokenizer": [("vocab.json+merges.txt or tokenizer.json", ("tokenizer.json", "merges.txt"))],
    "scheduler": [("scheduler_config.json", ("scheduler_config.json",))],
}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[A-Za-z0-9][\w.\-]*$")


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (truncated, bad header), or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"is truncated ({size} bytes)"
            length = int.from_bytes(raw, "little")
            if length <= 0 or 8 + length > size:
                return f"is truncated or corrupt (header of {length} bytes, file of {size} bytes)"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except ValueError:
        return "has a corrupt header (not JSON)"
    if not isinstance(header, dict):
        return "has a corrupt header"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    needed = 8 + length + (max(ends) if ends else 0)
    if needed > size:
        return f"is truncated ({size} bytes, its header needs {needed})"
    return None


def _check_files(folder: Path, label: str, field: str) -> None:
    """Every JSON file parses and every safetensors file is complete (configs and weights of ``folder``)."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else f"invalid JSON: {str(exc).splitlines()[0]}"
                raise ConfigError(f"{field}: '{label}' has a broken {rel.as_posix()} ({reason})") from None
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                raise ConfigError(f"{field}: '{label}': {rel.as_posix()} {problem} (download or copy the model again)")


def _pipeline_components(path: Path) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """The component subfolders a pipeline folder must hold: a transformer-based pipeline (Wan) lists
    ``transformer`` (and ``transformer_2``) in its ``model_index.json`` instead of ``unet``."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    components = dict(_COMPONENT_FILES)
    transformers = [name for name in ("transformer", "transformer_2")
                    if isinstance(index, dict) and isinstance(index.get(name), list) and index[name][-1] is not None]
    if transformers:
        del components["unet"]
        components.update({name: _COMPONENT_FILES["unet"] for name in transformers})
    return components


def check_model_folder(model: str, base_model: str | None) -> None:
    """Refuse a local model folder that cannot load, before any rank starts (a hub id is left to the ranks).

    Checks the layout (a pipeline folder, or a UNet-only folder with ``base_model``), that each
    component has its config and weights, that every JSON file parses and every safetensors file is
    complete. Wrong weight shapes are only found when the ranks load the model.
    """
    path = Path(model).expanduser()
    if not path.exists():
        if _HUB_ID.match(model) is None or model.startswith((".", "~")):
            raise ConfigError(f"model: folder '{model}' does not exist")
        return  # a hub id: the ranks look it up (offline: in the Hugging Face cache)
    if not path.is_dir():
        raise ConfigError(f"model: '{model}' is a file; expected a diffusers model folder or a hub id")
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        missing = []
        for component, needs in _pipeline_components(path).items():
            sub = path / component
            if not sub.is_dir():
                missing.append(f"{component}/")
                continue
            missing += [f"{component}/{what}" for what, globs in needs if not any(any(sub.glob(g)) for g in globs)]
        if missing:
            raise ConfigError(f"model: folder '{model}' is incomplete: missing {', '.join(missing)}")
        _check_files(path, model, "model")
        return
    if (path / "config.json").is_file():
        _check_files(path, model, "model")
        if base_model is None:
            raise ConfigError(f"base_model: model '{model}' holds only a UNet; set base_model to a diffusers "
                              "pipeline that provides vae, text_encoder, tokenizer and scheduler")
        check_model_folder(base_model, None)
        return
    raise ConfigError(f"model: '{model}' is not a diffusers model folder: it has neither model_index.json (pipeline "
                      "with unet/ vae/ text_encoder/ tokenizer/ scheduler/) nor a UNet config.json")


def check_video_shape(config: RunConfig, model: str, world_size: int) -> None:
    """Refuse a frame count or size a local transformer-based (Wan) folder cannot make, before any rank
    starts: video frames ``t*k + 1`` for the VAE's temporal compression ``t``, height and width
    multiples of its spatial compression times the transformer's patch size (16 for Wan)."""
    path = Path(model).expanduser()
    if not (path / "transformer" / "config.json").is_file() or not (path / "vae" / "config.json").is_file():
        return  # a UNet family (checked by the pipeline's own rules) or a hub id (checked by the ranks)
    vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
    transformer = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    pipe = config.pipe_configs
    field = "pipe_configs.total_frames" if pipe.total_frames is not None else "pipe_configs.num_frames"
    try:
        latent_frame_count(pipe.total_frames_for(world_size), int(vae.get("scale_factor_temporal", 4)))
    except ValueError as exc:
        raise ConfigError(f"{field}: {str(exc).removeprefix('num_frames: ')} (the whole video's frames)") from None
    patch = transformer.get("patch_size") or [1, 1, 1]
    multiple = int(vae.get("scale_factor_spatial", 8)) * int(patch[-1])
    for name in ("height", "width"):
        value = getattr(pipe, name)
        if value % multiple:
            lower = value - value % multiple
            raise ConfigError(f"pipe_configs.{name}: this model needs a multiple of {multiple}, got {value} "
                              f"(use {max(lower, multiple)} or {lower + multiple})")


def check_motion_adapter_folder(adapter: str) -> None:
    """Refuse a motion adapter that is not a complete local ``MotionAdapter`` folder."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ConfigError(f"motion_adapter: folder '{adapter}' does not exist (give a diffusers MotionAdapter folder)")
    if not (path / "config.json").is_file() or not any(path.glob("diffusion_pytorch_model*")):
        raise ConfigError(f"motion_adapter: folder '{adapter}' is incomplete: it needs config.json and "
                          "diffusion_pytorch_model weights (a diffusers MotionAdapter folder)")
    _check_files(path, adapter, "motion_adapter")


def _read_config(path: Path) -> dict[str, Any] | None:
    """A JSON config file as a dict; None when missing or unreadable."""
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _model_config(model: str, sub: str) -> dict[str, Any]:
    """Component ``sub``'s config, else the folder's own (a component-only folder); {} if neither."""
    for candidate in (Path(model) / sub / "config.json", Path(model) / "config.json"):
        config = _read_config(candidate)
        if config is not None:
            return config
    return {}


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _latent_layout(config: RunConfig, model: str) -> tuple[int, int]:
    """``(values, bytes per value)`` of the whole video's latents in the sampling loop: UNet models have
    one latent frame per video frame and latents in the run's dtype; Wan (a ``transformer/``) has
    ``(frames - 1) / 4 + 1`` latent frames, the transformer's channels, the VAE's spatial factor and
    float32 latents."""
    pipe = config.pipe_configs
    vae = _model_config(model, "vae")
    transformer = _read_config(Path(model) / "transformer" / "config.json") or {}  # no fallback: UNet folders
    if transformer:
        channels = int(transformer.get("out_channels") or transformer.get("in_channels") or 16)
        frames = latent_frame_count(config.total_frames, int(vae.get("scale_factor_temporal", 4)))
        scale, element = int(vae.get("scale_factor_spatial", 8)), 4
    else:
        channels, frames = int(_model_config(model, "unet").get("in_channels", 4)), config.total_frames
        scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        element = 4 if config.uses_cpu or config.dtype == "float32" else 2
    return channels * frames * (pipe.height // scale) * (pipe.width // scale), element


def _scheduler_history(config: RunConfig, model: str) -> int:
    """Latent-sized tensors the sampler keeps between steps (what a checkpoint saves besides the latents)."""
    name = config.pipe_configs.scheduler
    if name is None:  # the family's default: the folder's own for Wan, DPM-Solver++ for UNet models
        name = "model" if (Path(model) / "transformer").is_dir() else "sde-dpmsolver++"
    if name == "ddim":
        return 1
    if name != "model":
        return 2  # DPM-Solver++ keeps its last solver_order (2) model outputs
    scheduler = _read_config(Path(model) / "scheduler" / "scheduler_config.json") or {}
    kind, order = scheduler.get("_class_name"), int(scheduler.get("solver_order", 2))
    return 1 if kind == "DDIMScheduler" else order + 1 if kind == "UniPCMultistepScheduler" else order  # UniPC: + last sample


def estimate_output_bytes(config: RunConfig, model: str) -> dict[str, int]:
    """Rough disk needs of a run: the MP4, the latents file, the checkpoint (with its temporary copy)."""
    pipe = config.pipe_configs
    frames = config.total_frames
    latent_values, element = _latent_layout(config, model)
    needs = {"video": frames * pipe.height * pipe.width * 3 // 8}  # H.264 at crf 18; noise-like frames compress poorly
    if pipe.save_latents:
        needs["latents"] = latent_values * 4
    if pipe.checkpoint_every is not None:
        needs["checkpoint"] = estimate_bytes(latent_values * element, _scheduler_history(config, model))
    return needs


def check_disk_space(config: RunConfig, model: str) -> None:
    """Refuse a run whose estimated outputs do not fit in ``base_path``'s free space."""
    base = Path(config.base_path)
    needs = estimate_output_bytes(config, model)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    total = sum(needs.values())
    if total > free:
        parts = ", ".join(f"{name} ~{_human(size)}" for name, size in needs.items())
        raise ConfigError(f"base_path: not enough disk space in {base}: the run needs about {_human(total)} ({parts}) "
                          f"but {_human(free)} is free (free some space, choose another base_path, or make the video "
                          "shorter or smaller)")


def _check_base_path(config: RunConfig) -> Path:
    base = Path(config.base_path)
    if base.exists() and not base.is_dir():
        raise ConfigError(f"base_path: {base} exists and is not a folder")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"base_path: cannot create {base}: {exc.strerror or exc}") from None
    try:  # os.access says yes to root and on read-only mounts: try for real
        with tempfile.TemporaryFile(dir=base, prefix=".video-infinity-write-test."):
            pass
    except OSError as exc:
        raise ConfigError(f"base_path: {base} is not writable ({exc.strerror or exc}; choose another folder)") from None
    return base


def _effective_dtype(config: RunConfig) -> str:
    return "float32" if config.uses_cpu else config.dtype


def prepare(config: RunConfig, overwrite: bool = False, resume: str | os.PathLike[str] | None = None,
            world_size: int | None = None, config_path: str | os.PathLike[str] | None = None,
            ) -> tuple[dict[str, Path], str, CheckpointPlan]:
    """All checks before a run: ``(output paths, model, checkpoint plan)``; ConfigError/CheckpointError if refused.

    ``config_path``: the config file being run, which no output may replace."""
    world_size = world_size or config.world_size
    model = resolve_model(config)
    problem = None if config.motion_adapter is not None else unsupported_model(model)  # else: the SD base
    if problem is not None:  # before base_path is created: nothing is written
        raise ConfigError(problem)
    _check_base_path(config)
    check_model_folder(model, config.base_model)
    check_video_shape(config, model, world_size)
    if config.motion_adapter is not None:
        check_motion_adapter_folder(config.motion_adapter)
    pipe = config.pipe_configs
    data: dict[str, Any] | None = None
    resume_path = Path(resume) if resume is not None else None
    if resume_path is not None:
        data = load_checkpoint(resume_path, f"--resume {resume_path}")
    # A config without file_name resumes under the name its checkpoint was saved with.
    saved_stem = None if data is None else (data.get("extra") or {}).get("file_stem")
    stem = None if pipe.file_name is not None else str(saved_stem or "") or None
    paths = output_paths(config, stem)
    check_outputs(config, paths, overwrite=overwrite, resume=resume_path, config_path=config_path)
    check_disk_space(config, model)
    plan = CheckpointPlan(path=paths["checkpoint"], every=pipe.checkpoint_every)
    if data is not None and resume_path is not None:
        # The same fingerprint as the ranks' pipeline computes: refused here, before any rank starts.
        check_compatible(data, resume_path, config_fingerprint(config, model, world_size, _effective_dtype(config)))
        step = int(data["step"])
        plan = CheckpointPlan(path=plan.path, every=plan.every, resume=resume_path)
        logger.info("resuming %s at step %d of %d (saved by %s rank(s))", resume_path, step, pipe.steps,
                    data.get("world_size"))
    return paths, model, plan

