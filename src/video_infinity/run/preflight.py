"""Pre-flight checks, once, before any rank starts: the model is one video-infinity runs (e.g. not a
Wan VACE folder), the images it is given decode and suit it, the output folder is writable and has room for the estimated outputs,
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
from ..checkpoint import estimate_bytes, load_checkpoint
from ..config import rotary_clip_refusal
from ..families import FolderFacts, detect, plans_memory, unsupported_model
from ..families.folder import ModelFolder
from .checkpoint import CheckpointPlan, check_compatible, config_fingerprint
from .config import RunConfig
from .outputs import check_outputs, output_paths

logger = logging.getLogger(__name__)

def resolve_model(config: RunConfig) -> str:
    """The model folder or hub id (with a motion adapter: its Stable Diffusion base); without one,
    the embedded demo model; an embedded model's name (``"demo-wan"``), its folder
    (:func:`video_infinity.demo.resolve_model`). ConfigError for an embedded model this installation lacks."""
    if config.motion_adapter is not None:
        return config.model if config.model is not None else str(config.base_model)
    from ..demo import resolve_model as resolve_name
    from ..errors import UserError

    try:
        return resolve_name(config.model)
    except UserError as exc:
        raise ConfigError(str(exc)) from None


# What each component subfolder of a pipeline folder must hold (as families/unet3d/model.py checks it at load time).
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


def _pipeline_components(model: str) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """The component subfolders a pipeline folder must hold: its family's denoisers (``unet``, or
    ``transformer`` and ``transformer_2``) besides the VAE, text encoder, tokenizer and scheduler."""
    facts = detect(model)
    components = {name: needs for name, needs in _COMPONENT_FILES.items() if name != "unet"}
    for name in facts.components if facts is not None else ("unet",):
        components[name] = _COMPONENT_FILES["unet"]
    folder = ModelFolder.find(model)
    if folder is not None and folder.has_component("image_encoder"):  # Wan2.1 I2V's CLIP
        components["image_encoder"] = _COMPONENT_FILES["text_encoder"]
        components["image_processor"] = [("preprocessor_config.json", ("preprocessor_config.json",))]
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
        for component, needs in _pipeline_components(model).items():
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
    """Refuse a frame count or size the model's family cannot make (from its folder's config files),
    before any rank starts: e.g. Wan's video frames ``t*k + 1`` for the VAE's temporal compression
    ``t``, height and width multiples of its spatial compression times the patch size (16)."""
    facts = detect(model)
    engine = config.request.engine_for(config.plugin_configs)
    if engine.attn.rotary_clip is not None and (config.motion_adapter is not None
                                                or (facts is not None and not facts.rotary_positions)):
        family = facts.family if facts is not None and config.motion_adapter is None else "animatediff"
        raise ConfigError(f"plugin_configs.{rotary_clip_refusal(family)}")
    looping = engine.loop
    if looping and (config.motion_adapter is not None or (facts is not None and not facts.supports_loop)):
        family = facts.family if facts is not None and config.motion_adapter is None else "animatediff"
        raise ConfigError(f"plugin_configs.loop: the {family} family does not make loops (its temporal windows do "
                          "not wrap around the video); set it to false")
    if facts is None:
        return  # a hub id not cached, or a motion adapter's base: checked by the ranks
    pipe = config.pipe_configs
    field = "pipe_configs.total_frames" if pipe.total_frames is not None else "pipe_configs.num_frames"
    try:
        facts.latent_frames(pipe.total_frames_for(world_size))
    except ValueError as exc:
        raise ConfigError(f"{field}: {str(exc).removeprefix('num_frames: ')} (the whole video's frames)") from None
    multiple = facts.spatial_multiple
    for name in ("height", "width"):
        value = getattr(pipe, name)
        if value % multiple:
            lower = value - value % multiple
            raise ConfigError(f"pipe_configs.{name}: this model needs a multiple of {multiple}, got {value} "
                              f"(use {max(lower, multiple)} or {lower + multiple})")


def _video_frames(path: Path) -> int:
    """Frames of a video file, decoded (PyAV): what a continuation is given."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def check_images(config: RunConfig, model: str) -> None:
    """Refuse image inputs the run cannot use, before any rank starts: a file that is not an image (or
    a video), images a text-to-video model cannot take, an image-to-video model without an image, an
    end image for a model without one, a continuation the model cannot split into its latent frames.
    An image of another aspect ratio than the video is resized to it (diffusers does): logged."""
    pipe = config.pipe_configs
    given = {name for name in ("image", "last_image", "video") if getattr(pipe, name) is not None}
    facts = detect(model)
    video_frames = None
    for name in sorted(given):
        path = Path(getattr(pipe, name)).expanduser()
        try:
            if name == "video":
                video_frames = _video_frames(path)
                if not video_frames:
                    raise ValueError("it holds no frames")
                continue
            from PIL import Image

            with Image.open(path) as image:
                image.load()
                width, height = image.size
        except Exception as exc:  # PIL and PyAV raise several kinds for a file they cannot decode
            kind = "a video" if name == "video" else "an image"
            raise ConfigError(f"pipe_configs.{name}: cannot read '{path}' as {kind} ({exc})") from None
        if abs(width / height - pipe.width / pipe.height) > 0.01 * pipe.width / pipe.height:
            logger.warning("pipe_configs.%s: %dx%d is resized to the video's %dx%d (another aspect ratio: it "
                           "will look stretched)", name, width, height, pipe.width, pipe.height)
    if facts is None:
        return  # a hub id not cached: the ranks check
    problem = facts.image_problem(model, given, video_frames, config.total_frames)
    if problem is not None:
        raise ConfigError(f"pipe_configs.{problem}" if not problem.startswith("num_frames") else
                          f"pipe_configs.total_frames: {problem.partition(': ')[2]}")


def check_motion_adapter_folder(adapter: str) -> None:
    """Refuse a motion adapter that is not a complete local ``MotionAdapter`` folder."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ConfigError(f"motion_adapter: folder '{adapter}' does not exist (give a diffusers MotionAdapter folder)")
    if not (path / "config.json").is_file() or not any(path.glob("diffusion_pytorch_model*")):
        raise ConfigError(f"motion_adapter: folder '{adapter}' is incomplete: it needs config.json and "
                          "diffusion_pytorch_model weights (a diffusers MotionAdapter folder)")
    _check_files(path, adapter, "motion_adapter")


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _latent_layout(config: RunConfig, facts: FolderFacts) -> tuple[int, int]:
    """``(values, bytes per value)`` of the whole video's latents in the sampling loop (the family's
    latent frames, channels and spatial factor; its latent dtype, else the run's)."""
    pipe = config.pipe_configs
    frames = facts.latent_frames(config.total_frames)
    scale = facts.spatial_factor
    element = facts.latent_element_bytes or (4 if config.uses_cpu or config.dtype == "float32" else 2)
    return facts.latent_channels * frames * (pipe.height // scale) * (pipe.width // scale), element


def estimate_output_bytes(config: RunConfig, model: str) -> dict[str, int]:
    """Rough disk needs of a run: the MP4, the latents file, the checkpoint (with its temporary copy)."""
    pipe = config.pipe_configs
    frames = config.total_frames
    facts = detect(model) or FolderFacts(family="unknown")  # not told by config files: a UNet's defaults
    latent_values, element = _latent_layout(config, facts)
    needs = {"video": frames * pipe.height * pipe.width * 3 // 8}  # H.264 at crf 18; noise-like frames compress poorly
    if pipe.save_latents:
        needs["latents"] = latent_values * 4
    if pipe.checkpoint_every is not None:
        needs["checkpoint"] = estimate_bytes(latent_values * element, facts.scheduler_history(pipe.scheduler))
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


def check_memory(config: RunConfig, model: str, world_size: int, gpu_memory: int | None = None) -> None:
    """Refuse a GPU run whose plan (:mod:`video_infinity.plan`, on meta tensors from the folder's config
    files) does not fit its GPUs' memory (``gpu_memory``: the smallest of the run's GPUs when None),
    before any weight loads. CPU runs, hub ids and families without a planner are not planned."""
    if config.uses_cpu and gpu_memory is None:
        return
    facts = detect(model)
    if facts is None or not Path(model).is_dir() or not plans_memory(facts.family):
        return
    from ..plan import gib, gpu_memory_of, plan_run, refusal  # torch: only for a GPU run about to start

    gpu_memory = gpu_memory if gpu_memory is not None else gpu_memory_of(config)
    if gpu_memory is None:
        return
    plan = plan_run(config.model_copy(update={"model": model}), gpu_memory, world_size)
    line = refusal(plan)
    if line is not None:
        raise ConfigError(line)
    logger.info("memory plan: at most %s per GPU of %s", gib(plan.peak_bytes), gib(gpu_memory))


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
    check_images(config, model)
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
    check_memory(config, model, world_size)
    plan = CheckpointPlan(path=paths["checkpoint"], every=pipe.checkpoint_every)
    if data is not None and resume_path is not None:
        # The same fingerprint as the ranks' pipeline computes: refused here, before any rank starts.
        check_compatible(data, resume_path, config_fingerprint(config, model, world_size, _effective_dtype(config)))
        step = int(data["step"])
        plan = CheckpointPlan(path=plan.path, every=plan.every, resume=resume_path)
        logger.info("resuming %s at step %d of %d (saved by %s rank(s))", resume_path, step, pipe.steps,
                    data.get("world_size"))
    return paths, model, plan

