"""The command line's run configuration: the top level of the original Video-Infinity JSON files
(``dtype``, ``devices``, ``pipe_configs``, ``plugin_configs``, ...) plus new keys, validated before
any model loads or process starts; every problem is a one-line :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from ..config import AttentionConfig, EngineConfig, _FieldError, _Strict
from ..errors import ConfigError
from ..presets import resolve_engine
from ..images import is_path
from ..request import GenerationRequest, KeyframeMode, NonEmptyText, request_field
from ..request import format_validation_error as _format_error
from ..schedulers import SchedulerName

if TYPE_CHECKING:
    import torch

__all__ = ["REQUEST_KEYS", "ConfigError", "config_data", "PipeConfig", "RunConfig", "RunFlag", "apply_overrides",
           "check_devices_available", "devices_from_text", "load_run_config", "read_config_file", "run_flags",
           "validate_run_config"]


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



REQUEST_KEYS: dict[str, str] = {
    "prompt": "pipe_configs.prompts",
    "negative_prompt": "pipe_configs.negative_prompt",
    "num_frames": "pipe_configs.total_frames",  # the original's pipe_configs.num_frames counts frames per device
    "height": "pipe_configs.height",
    "width": "pipe_configs.width",
    "num_inference_steps": "pipe_configs.steps",
    "guidance_scale": "pipe_configs.guidance_scale",
    "fps": "pipe_configs.fps",
    "seed": "seed",
    "scheduler": "pipe_configs.scheduler",
    "eta": "pipe_configs.eta",
    "transition_frames": "pipe_configs.transition_frames",
    "keyframe_mode": "pipe_configs.keyframe_mode",
    "engine": "plugin_configs",
    "loop": "plugin_configs.loop",
    "image": "pipe_configs.image",
    "last_image": "pipe_configs.last_image",
    "video": "pipe_configs.video",
}
"""Each field of :class:`GenerationRequest` -> its key in a run config file (the original's
Video-Infinity JSON keys): the one map between the two shapes (``RunConfig.request``, the
command line's flags, the web form)."""


IMAGE_FIELDS = ("image", "last_image", "video")
"""Request fields holding images (paths in a run config)."""


def config_data(request: GenerationRequest | Mapping[str, Any]) -> dict[str, Any]:
    """The run config keys of a request, or of values by request field still to be validated (the
    run config validates them as its request, after its own checks): the inverse of
    ``RunConfig.request``. None values are left out (the file's defaults mean the same: fps 24)."""
    data: dict[str, Any] = {}
    dumped = request.model_dump(mode="json") if isinstance(request, GenerationRequest) else dict(request)
    for name in IMAGE_FIELDS:  # a file names its images by path (the JSON dump describes them with a hash)
        value = getattr(request, name) if isinstance(request, GenerationRequest) else dumped.get(name)
        if value is not None and not is_path(value):
            raise ValueError(f"{name}: a run config names images by path; save the in-memory {name} to a file")
        dumped[name] = None if value is None else str(value)
    values = {name: value for name, value in dumped.items() if value is not None}
    for name in sorted(values, key=lambda name: REQUEST_KEYS[name].count(".")):  # plugin_configs before its loop
        *parents, last = REQUEST_KEYS[name].split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = values[name]
    return data


def _value_at(node: Any, path: str) -> Any:
    for part in path.split("."):
        node = getattr(node, part)
    return node


class PipeConfig(_StrictRun):
    """What to generate (the original's ``pipe_configs``): the request's fields under the original's
    keys (their checks, defaults and docstrings come from :class:`GenerationRequest`), plus what
    only a run has (the MP4's frame rate, the file name, checkpoints)."""

    prompts: list[NonEmptyText] | dict[int, NonEmptyText] = request_field("prompt")
    negative_prompt: str | None = request_field("negative_prompt")
    steps: int = request_field("num_inference_steps")
    guidance_scale: float = request_field("guidance_scale")
    # The original's default: VideoCrafter2's conditioning value (the request's None means the same).
    fps: int = request_field("fps", default=24)
    num_frames: int | None = Field(default=None, ge=1)
    """Frames PER DEVICE, as in the original (the video has ``num_frames * len(devices)`` frames)."""
    total_frames: int | None = request_field("num_frames", default=None)
    """Video length, independent of the device count (the request's ``num_frames``); excludes ``num_frames``."""
    height: int = request_field("height")
    width: int = request_field("width")
    export_fps: int = Field(default=8, ge=1)
    """Frame rate of the written MP4."""
    file_name: str | None = None
    """Output name inside ``base_path`` (no directories); None: derived from the first prompt and a timestamp."""
    transition_frames: int = request_field("transition_frames")
    keyframe_mode: KeyframeMode = request_field("keyframe_mode")
    scheduler: SchedulerName | None = request_field("scheduler")
    save_latents: bool = False
    """Also write the final latents as ``<base_path>/<file_name>.latents.npy`` (float32)."""
    eta: float = request_field("eta")
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Save a checkpoint (``<base_path>/<file_name>.ckpt``) every this many denoising steps, to
    continue an interrupted run with ``generate --resume``; None: no checkpoints."""
    image: str | None = None
    """Image-to-video: the path of the video's first frame (an image file, resized to height x width)."""
    last_image: str | None = None
    """Image-to-video: the path of the video's last frame (first-last-frame models); needs image."""
    video: str | None = None
    """Continuation: the path of a video file whose frames start the video (instead of image)."""

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
    def _one_prompt(cls, value: Any) -> Any:
        # A string is one prompt: the file keeps the original's list (or keyframe dict) shape.
        return [value] if isinstance(value, str) and value else value

    @property
    def first_prompt(self) -> str:
        """The prompt the video starts with (list item or frame 0's)."""
        return self.prompts[0]

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
    """GPU ids (one process each, NCCL), or ``"cpu"`` entries (that many CPU processes, gloo); as a
    flag: ``2`` (two CPU processes), ``gpu:0,1`` or the JSON list."""
    seed: int = request_field("seed", default=123)
    master_port: int = Field(default=29516, ge=1, le=65535)
    """Rendezvous port of the built-in launcher (replaced by a free one when taken)."""
    collective_timeout_s: float = Field(default=1800.0, gt=0, allow_inf_nan=False)
    """Seconds a rank waits on its peers in one collective (rendezvous included) before giving up;
    covers rank 0's VAE decode while the others wait. A dead rank is detected at once regardless."""
    base_path: str = Field(default="./exp", min_length=1)
    """Output folder."""
    model: str | None = None
    """An embedded model's name (``demo``, ``demo-wan``), a local diffusers folder or a hub id; None:
    the embedded demo model (``demo``)."""
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
        return resolve_engine(value) if isinstance(value, str) else value

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

    _request: GenerationRequest = PrivateAttr()

    @model_validator(mode="after")
    def _frames_cover_devices(self) -> RunConfig:
        message = self.pipe_configs._world_size_problem(self.world_size)
        if message is not None:
            raise _FieldError("pipe_configs.total_frames", message)
        return self

    @model_validator(mode="after")
    def _make_request(self) -> RunConfig:
        # The request's own checks (keyframes inside the video, eta with DDIM, ...) run here, and
        # name the file's key: "pipe_configs.steps", not "num_inference_steps".
        values: dict[str, Any] = {name: _value_at(self, path) for name, path in REQUEST_KEYS.items()}
        values["num_frames"] = self.total_frames  # the file may count frames per device
        try:
            self._request = GenerationRequest.model_validate(values)
        except ValidationError as exc:
            field, _, problem = _format_error(exc).partition(": ")
            name, _, rest = field.partition(".")
            raise _FieldError(".".join(filter(None, (REQUEST_KEYS.get(name, name), rest))), problem) from None
        return self

    @property
    def request(self) -> GenerationRequest:
        """What this run generates, as the Python call takes it (the same checks, one schema)."""
        return self._request

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


# ValidationError.title (the validated class's name) -> class, to list the allowed keys of unknown ones.
_ROOT_MODELS: dict[str, type[BaseModel]] = {m.__name__: m for m in (RunConfig, PipeConfig, EngineConfig, AttentionConfig)}


def format_validation_error(exc: ValidationError) -> str:
    """One line for the first error of ``exc``: ``<field path>: <problem> (<fix>)``."""
    return _format_error(exc, _ROOT_MODELS)


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


def load_run_config(path: str | Path | None, overrides: Iterable[str] = (),
                    flags: Mapping[str, str | bool | None] | None = None,
                    defaults: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a JSON config file (None: ``defaults``, else every key at its default), apply the
    command line's flags (:func:`run_flags`: field name -> the text given) and then its ``--set``
    overrides, and validate; problems raise a one-line ConfigError (naming the flag when a flag's
    value is at fault)."""
    data = read_config_file(path) if path is not None else copy.deepcopy(dict(defaults or {}))
    # Parents first: --engine replaces plugin_configs, then --loop sets plugin_configs.loop in it.
    given = sorted((flag for flag in run_flags() if flags and flags.get(flag.name) is not None),
                   key=lambda flag: flag.path.count("."))
    try:
        for flag in given:
            data = flag.apply(data, flags[flag.name])  # type: ignore[index]
        return validate_run_config(apply_overrides(data, overrides))
    except ConfigError as exc:
        where, sep, problem = str(exc).partition(": ")
        at_fault = next((f for f in given if where == f.path or where.startswith(f"{f.path}.")), None)
        if at_fault is None or not sep or any(o.partition("=")[0].strip() == at_fault.path for o in overrides):
            raise
        inside = where[len(at_fault.path) + 1:]  # e.g. attn.paddin inside --engine's knobs
        raise ConfigError(f"{at_fault.option}: {inside + ': ' if inside else ''}{problem}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object in a config file, unvalidated; problems raise ConfigError."""
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
    return data


# --------------------------------------------------------------------------------------------------
# The command line's flags, generated from the schemas: the request's fields, then the run's own keys


@dataclass(frozen=True)
class RunFlag:
    """One ``generate`` flag: a field of the request or of the run, and where it goes in a config."""

    name: str
    """The field's name (``num_inference_steps``); the flag is ``--num-inference-steps``."""
    path: str
    """Its key in a run config (``pipe_configs.steps``)."""
    help: str
    """The field's docstring."""
    annotation: Any
    default: Any
    aliases: tuple[str, ...] = ()
    """The original's key as a flag too, when its name differs (``--steps``)."""
    replaces: tuple[str, ...] = ()
    """Config keys this one excludes, removed when the flag is given (a file's per-device ``num_frames``)."""

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return self.annotation in (bool, bool | None)

    def value(self, text: str) -> Any:
        """The config value of the flag's text: JSON where the field takes numbers, lists or objects,
        else the text itself (a prompt, a name), so that plain words need no quoting."""
        if self.name == "devices":
            return devices_from_text(text)
        structured = text.lstrip()[:1] in ("[", "{")
        names = self.name == "engine"  # a preset's name, or knobs as JSON
        if _takes_text(self.annotation) or ((_admits_text(self.annotation) or names) and not structured):
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text  # the schema names the field and says what it wants

    def apply(self, data: dict[str, Any], text: str | bool) -> dict[str, Any]:
        """A copy of ``data`` with this flag's value at its key."""
        data = copy.deepcopy(data)
        *parents, last = self.path.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if isinstance(child, str) and part == "plugin_configs":  # a preset's name: its settings, to change one
                child = resolve_engine(child).model_dump(mode="json")
            node[part] = child = child if isinstance(child, dict) else {}
            node = child
        for key in self.replaces:
            node.pop(key.rpartition(".")[2], None)
        node[last] = text if isinstance(text, bool) else self.value(text)
        return data


def _options(annotation: Any) -> list[Any]:
    return [a for a in (get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,))
            if a is not type(None)]


def _takes_text(annotation: Any) -> bool:
    """Whether a field's values are all text (str, a Literal of names, optionally None)."""
    return all(a is str or get_origin(a) is Literal for a in _options(annotation))


def _admits_text(annotation: Any) -> bool:
    """Whether some of a field's values are text (a prompt: a string, or a list or dict of them)."""
    return any(a is str or get_origin(a) is Literal for a in _options(annotation))


def devices_from_text(text: str) -> Any:
    """``--devices``: a number of CPU processes (``2``), GPU ids (``gpu:0,1``) or the config's JSON list."""
    raw = str(text).strip()
    hint = 'give a number of CPU processes ("2") or GPU ids ("gpu:0,1")'
    if raw.isdigit():
        if int(raw) < 1:
            raise ConfigError(f"devices: at least 1 process, got {raw} ({hint})")
        return ["cpu"] * int(raw)
    for prefix in ("gpu:", "cuda:", "gpus:"):
        if raw.lower().startswith(prefix):
            ids = [part.strip() for part in raw[len(prefix):].split(",")]
            if not all(part.isdigit() for part in ids):
                raise ConfigError(f"devices: GPU ids must be numbers, got {raw!r} (e.g. gpu:0,1)")
            return [int(part) for part in ids]
    if raw.startswith("["):
        try:
            return json.loads(raw)  # the config's own validation judges the list
        except ValueError:
            raise ConfigError(f"devices: {raw!r} is not a JSON list ({hint})") from None
    raise ConfigError(f"devices: cannot read {raw!r} ({hint})")


def run_flags() -> list[RunFlag]:
    """``generate``'s flags: one per request field (under its diffusers name, and its original key
    as an alias), then one per key of a run that is not the request's (model, devices, ...)."""
    flags = []
    for name, field in GenerationRequest.model_fields.items():
        path = REQUEST_KEYS[name]
        leaf = path.rpartition(".")[2]
        flags.append(RunFlag(name, path, _doc(field), field.annotation, _config_default(path),
                             aliases=("--" + leaf.replace("_", "-"),) if leaf != name else (),
                             replaces=("pipe_configs.num_frames",) if name == "num_frames" else ()))
    taken = set(REQUEST_KEYS.values())
    for prefix, model in (("", RunConfig), ("pipe_configs.", PipeConfig)):
        for name, field in model.model_fields.items():
            path = prefix + name
            # Containers and the file's per-device frame count are not flags: --num-frames is the video's.
            if path in taken or path in ("pipe_configs", "plugin_configs", "pipe_configs.num_frames"):
                continue
            flags.append(RunFlag(name, path, _doc(field), field.annotation, field.default))
    return flags


def _config_default(path: str) -> Any:
    """The default of a config key, e.g. ``pipe_configs.steps`` -> 30 (None where it has none)."""
    model: Any = RunConfig
    for part in path.split("."):
        field = model.model_fields[part] if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
        default = field.default
    return None if isinstance(default, BaseModel) or default is PydanticUndefined else default


def _doc(field: Any) -> str:
    return " ".join((field.description or "").split())


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
