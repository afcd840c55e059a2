"""The command line's run configuration: the top level of the original Video-Infinity JSON files
(``dtype``, ``devices``, ``pipe_configs``, ``plugin_configs``, ...) plus new keys, validated before
any model loads or process starts; every problem is a one-line :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from ..config import AttentionConfig, EngineConfig, _FieldError, _Strict
from ..errors import ConfigError
from ..schedulers import SchedulerName

if TYPE_CHECKING:
    import torch

__all__ = ["ConfigError", "PipeConfig", "RunConfig", "apply_overrides", "check_devices_available",
           "load_run_config", "validate_run_config"]


class _StrictRun(_Strict):
    # Strict types: "30" for steps or true for a height is a mistake in a config file, not a value.
    model_config = ConfigDict(strict=True)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DTYPES: dict[str, str] = {
    **dict.fromkeys(("torch.float16", "float16", "fp16", "half"), "float16"),
    **dict.fromkeys(("torch.bfloat16", "bfloat16", "bf16"), "bfloat16"),
    **dict.fromkeys(("torch.float32", "float32", "fp32", "float"), "float32"),
}



class PipeConfig(_StrictRun):
    """What to generate (the original's ``pipe_configs``)."""

    prompts: list[Annotated[str, StringConstraints(min_length=1)]] | dict[int, Annotated[str, StringConstraints(min_length=1)]]
    """Text prompts: a list, spread over the video as consecutive segments of (nearly) equal length;
    or FreeNoise's ``{"frame": "prompt"}`` keyframes (frame 0 required, every key a frame of the
    video; embeddings blend linearly from one keyframe to the next, the last one holds to the end)."""
    negative_prompt: str | None = None
    """What the video should not show (classifier-free guidance's unconditional text); None: empty."""
    steps: int = Field(default=30, ge=1)
    """Number of denoising steps."""
    guidance_scale: float = Field(default=12.0, ge=0, allow_inf_nan=False)
    """Classifier-free guidance scale."""
    fps: int = Field(default=24, ge=1)
    """Frame-rate conditioning value (used by fps-conditioned UNets such as VideoCrafter2)."""
    num_frames: int | None = Field(default=None, ge=1)
    """Frames PER DEVICE, as in the original (the video has ``num_frames * len(devices)`` frames)."""
    total_frames: int | None = Field(default=None, ge=1)
    """Video length, independent of the device count; excludes ``num_frames``."""
    height: int = 320
    """Frame height in pixels, a positive multiple of 8."""
    width: int = 512
    """Frame width in pixels, a positive multiple of 8."""
    export_fps: int = Field(default=8, ge=1)
    """Frame rate of the written MP4."""
    file_name: str | None = None
    """Output name inside ``base_path`` (no directories); None: derived from the first prompt and a timestamp."""
    transition_frames: int = Field(default=0, ge=0)
    """Frames over which the text embeddings of neighbouring prompt segments are blended (a list of
    prompts, or keyframes with ``keyframe_mode: "hold"``)."""
    keyframe_mode: Literal["interpolate", "hold"] = "interpolate"
    """How ``{"frame": "prompt"}`` keyframes spread: ``interpolate`` (FreeNoise: the embedding goes
    linearly from each keyframe to the next) or ``hold`` (each prompt holds from its frame until the
    next keyframe, ``transition_frames`` frames blending across each change)."""
    scheduler: SchedulerName | None = None
    """Sampler; None: the model family's default (``sde-dpmsolver++`` for UNet3D models, what the
    original's published runs used; ``model``, the folder's own flow-matching UniPC, for Wan)."""
    save_latents: bool = False
    """Also write the final latents as ``<base_path>/<file_name>.latents.npy`` (float32)."""
    eta: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """DDIM's eta (0: deterministic); only used by the ``ddim`` scheduler."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Save a checkpoint (``<base_path>/<file_name>.ckpt``) every this many denoising steps, to
    continue an interrupted run with ``generate --resume``; None: no checkpoints."""

    @model_validator(mode="before")
    @classmethod
    def _frame_count(cls, data: Any) -> Any:
        if isinstance(data, dict):
            num, total = data.get("num_frames"), data.get("total_frames")
            if num is not None and total is not None:
                raise _FieldError(
                    "total_frames",
                    "give either num_frames (per device) or total_frames (whole video), not both",
                )
            if num is None and total is None:  # the original's default: 24 frames per device
                data = {**data, "num_frames": 24}
        return data

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        # Checked by hand: the union of a list and a dict gives unreadable errors.
        if isinstance(value, dict):
            if not value:
                raise ValueError('the {"frame": "prompt"} dict is empty (give at least {"0": "..."})')
            keys = {}
            for key, prompt in value.items():
                text = str(key).strip()
                if isinstance(key, bool) or not (text.isdigit()):
                    raise ValueError(f"keys must be frame numbers (0, 1, ...), got {_short(key)}")
                if not isinstance(prompt, str) or not prompt:
                    raise ValueError(f"frame {text}: the prompt must be a non-empty string, got {_short(prompt)}")
                if int(text) in keys:
                    raise ValueError(f"frame {int(text)} is given twice")
                keys[int(text)] = prompt
            if 0 not in keys:
                raise ValueError("a {\"frame\": \"prompt\"} dict needs a prompt for frame 0")
            return dict(sorted(keys.items()))
        if not isinstance(value, list) or not value:
            raise ValueError(f'must hold at least 1 prompt (a list, or a {{"frame": "prompt"}} dict), got {_short(value)}')
        return value

    @property
    def first_prompt(self) -> str:
        """The prompt the video starts with (list item or frame 0's)."""
        return self.prompts[0]

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        # The VAE downsamples by 8: other sizes cannot be encoded exactly.
        if value <= 0 or value % 8:
            lower, upper = max(8, value // 8 * 8), max(8, value // 8 * 8 + 8)
            hint = f"use e.g. {lower} or {upper}" if lower != upper and value > 8 else "use e.g. 8"
            raise ValueError(f"must be a positive multiple of 8, got {value} ({hint})")
        return value

    @field_validator("file_name")
    @classmethod
    def _plain_file_name(cls, value: str | None) -> str | None:
        # The name is joined to base_path: it must never point outside it.
        if value is None:
            return None
        if (
            not value.strip()
            or "/" in value
            or "\\" in value
            or ".." in value
            or "\0" in value
            or PurePosixPath(value).is_absolute()
            or PureWindowsPath(value).drive
        ):
            raise ValueError(
                f"must be a plain file name without directories or '..', got {_short(value)} "
                "(put directories in base_path)"
            )
        return value

    @model_validator(mode="after")
    def _eta_only_for_ddim(self) -> PipeConfig:
        if self.eta and self.scheduler != "ddim":
            raise _FieldError("eta", f"only used by the 'ddim' scheduler, got scheduler {self.scheduler!r} (set eta to 0)")
        return self

    def total_frames_for(self, world_size: int) -> int:
        """Number of frames of the whole video when run on ``world_size`` devices."""
        return self.total_frames if self.total_frames is not None else self.num_frames * world_size  # type: ignore[operator]

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError when the video has fewer frames than devices (a rank would get none)."""
        message = self._world_size_problem(world_size)
        if message is not None:
            raise ConfigError(f"pipe_configs.total_frames: {message}")

    def _world_size_problem(self, world_size: int) -> str | None:
        total = self.total_frames_for(world_size)
        if total < world_size:
            return f"the video has {total} frames but there are {world_size} devices (use at least one frame per device)"
        return None

    def _keyframe_problem(self, world_size: int) -> str | None:
        if not isinstance(self.prompts, dict):
            return None
        total = self.total_frames_for(world_size)
        late = [k for k in self.prompts if k >= total]
        if late:
            return f"keyframe {late[0]} is past the video's last frame ({total - 1}; the video has {total} frames)"
        return None

    def resolved_file_name(self, now: datetime | None = None) -> str:
        """The output stem: ``file_name`` (a trailing ``.mp4`` dropped) or ``<first prompt>_<timestamp>``."""
        if self.file_name is not None:
            return self.file_name[:-4] if self.file_name.lower().endswith(".mp4") and len(self.file_name) > 4 else self.file_name
        slug = re.sub(r"[^a-z0-9]+", "_", self.first_prompt.lower()).strip("_")[:48] or "video"
        return f"{slug}_{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


class RunConfig(_StrictRun):
    """A whole run: the top level of the original JSON config, plus ``model`` and ``base_model``."""

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Compute dtype; accepts the original's ``"torch.float16"`` and common aliases."""
    devices: list[int] | list[Literal["cpu"]] = [0]
    """GPU ids (one process each, NCCL), or ``"cpu"`` entries (that many CPU processes, gloo)."""
    seed: int = 123
    """Random seed; the same seed gives the same video whatever the number of devices."""
    master_port: int = Field(default=29516, ge=1, le=65535)
    """Rendezvous port of the built-in launcher (replaced by a free one when taken)."""
    collective_timeout_s: float = Field(default=1800.0, gt=0, allow_inf_nan=False)
    """Seconds a rank waits on its peers in one collective (rendezvous included) before giving up;
    covers rank 0's VAE decode while the others wait. A dead rank is detected at once regardless."""
    base_path: str = Field(default="./exp", min_length=1)
    """Output folder."""
    model: str | None = None
    """Local diffusers folder or hub id; None: the embedded demo model."""
    base_model: str | None = None
    """Where the VAE, text encoder, tokenizer and scheduler come from when ``model`` is a UNet-only
    folder (such as VideoCrafter2's diffusers UNet), or the Stable Diffusion 1.5 pipeline that
    ``motion_adapter`` extends; None: same as ``model``."""
    motion_adapter: str | None = None
    """An AnimateDiff ``MotionAdapter`` folder: the run's model is then the Stable Diffusion 1.5
    pipeline at ``base_model`` (or ``model``) with this adapter (an AnimateDiff pipeline folder
    needs no adapter: give it as ``model``)."""
    pipe_configs: PipeConfig
    """What to generate."""
    plugin_configs: EngineConfig = EngineConfig()
    """Engine knobs (the original's ``plugin_configs``), or the name of a preset (``"wan"``, see
    :mod:`video_infinity.presets`)."""

    @field_validator("plugin_configs", mode="before")
    @classmethod
    def _preset_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            from ..presets import PRESETS

            if value not in PRESETS:
                raise ValueError(f"unknown preset {_short(value)}; give engine knobs or one of {sorted(PRESETS)}")
            return EngineConfig.model_validate(PRESETS[value])
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _normalise_dtype(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _DTYPES:
            return _DTYPES[value.strip().lower()]
        raise ValueError(f"must be one of float16, bfloat16, float32 (or torch.float16, fp16, bf16, ...), got {_short(value)}")

    @field_validator("devices", mode="before")
    @classmethod
    def _check_devices(cls, value: Any) -> Any:
        # Checked by hand: a union of list types gives unreadable errors.
        if not isinstance(value, list) or not value:
            raise ValueError(f'must be a non-empty list of GPU ids or of "cpu" entries, got {_short(value)} (e.g. [0, 1] or ["cpu", "cpu"])')
        if all(entry == "cpu" for entry in value):
            return value
        if not all(type(entry) is int and entry >= 0 for entry in value):
            raise ValueError(f'entries must be all GPU ids (integers >= 0) or all "cpu", got {_short(value)}')
        duplicates = sorted({entry for entry in value if value.count(entry) > 1})
        if duplicates:
            raise ValueError(f"GPU {duplicates[0]} is listed twice, got {_short(value)} (each GPU runs one process)")
        return value

    @model_validator(mode="after")
    def _frames_cover_devices(self) -> RunConfig:
        message = self.pipe_configs._world_size_problem(self.world_size)
        if message is not None:
            raise _FieldError("pipe_configs.total_frames", message)
        message = self.pipe_configs._keyframe_problem(self.world_size)
        if message is not None:
            raise _FieldError("pipe_configs.prompts", message)
        return self

    @model_validator(mode="after")
    def _adapter_has_a_base(self) -> RunConfig:
        if self.motion_adapter is None:
            return self
        if self.model is not None and self.base_model is not None and self.model != self.base_model:
            raise _FieldError("motion_adapter", "give its Stable Diffusion base as base_model or as model, not both")
        if self.model is None and self.base_model is None:
            raise _FieldError("motion_adapter", "also set base_model to the Stable Diffusion 1.5 pipeline it extends")
        return self

    @property
    def world_size(self) -> int:
        """Number of processes (one per entry of ``devices``)."""
        return len(self.devices)

    @property
    def uses_cpu(self) -> bool:
        """True when the devices are ``"cpu"`` entries."""
        return self.devices[0] == "cpu"

    @property
    def total_frames(self) -> int:
        """Number of frames of the whole video."""
        return self.pipe_configs.total_frames_for(self.world_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype."""
        import torch  # lazily: validating a config must not pay for importing torch

        return getattr(torch, self.dtype)


def _model_at(model: type[BaseModel] | None, path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class reached by following ``path`` (field names; list indices skipped)."""
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


# ValidationError.title (the validated class's name) -> class, to list the allowed keys of unknown ones.
_ROOT_MODELS: dict[str, type[BaseModel]] = {m.__name__: m for m in (RunConfig, PipeConfig, EngineConfig, AttentionConfig)}


def format_validation_error(exc: ValidationError) -> str:
    """One line for the first error of ``exc``: ``<field path>: <problem> (<fix>)``."""
    errors = exc.errors()
    if not errors:
        return str(exc).splitlines()[0]
    # An unknown key first: a misspelt key usually also shows up as a missing required one.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    # Drop a union's branch tags (``list[constrained-str]``): field names have no brackets.
    loc = tuple(part for part in error.get("loc", ()) if not (isinstance(part, str) and "[" in part))
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        loc = (*loc, *cause.field.split("."))
    where = ".".join(str(part) for part in loc) or "config"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = list((_model_at(_ROOT_MODELS.get(exc.title), loc[:-1]) or BaseModel).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: unknown key, allowed keys: {', '.join(allowed)}{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if isinstance(cause, ValueError):
        return f"{where}: {cause}"
    return f"{where}: {error['msg'].rstrip('.')}, got {_short(error.get('input'))}"


def validate_run_config(data: Any) -> RunConfig:
    """Validate already-parsed JSON into a RunConfig; any problem is a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a JSON object, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys silently; in a config that hides a mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``key.path=value`` overrides applied (value parsed as JSON if it parses)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {_short(item)}: expected key.path=value, e.g. pipe_configs.steps=10")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # not JSON: a plain string, so prompts need no quoting
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                parent = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key.strip()}: {parent} is a {type(node).__name__}, not an object with keys")
        node[parts[-1]] = value
    return data


def load_run_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a JSON config file, apply ``--set`` overrides and validate it; problems raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.__class__.__name__}: {exc})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return validate_run_config(apply_overrides(data, overrides))


def check_devices_available(config: RunConfig) -> None:
    """Raise ConfigError when a GPU id in ``config.devices`` does not exist on this machine."""
    if config.uses_cpu:
        return
    import torch  # lazily: only needed once the config is valid

    count = torch.cuda.device_count()
    missing = [device for device in config.devices if device >= count]  # type: ignore[operator]
    if not missing:
        return
    if count == 0:
        raise ConfigError(
            f'devices: GPU {missing[0]} does not exist (this machine has no GPU; use "cpu" entries, '
            f'e.g. {json.dumps(["cpu"] * config.world_size)})'
        )
    noun = "GPU" if count == 1 else "GPUs"
    raise ConfigError(f"devices: GPU {missing[0]} does not exist (this machine has {count} {noun}: ids 0..{count - 1})")
