"""The web UI's form as a run config: the values a user enters (a prompt timeline, sizes, devices,
engine knobs, an image-to-video model's start and end images as paths) become a generation request (:class:`~video_infinity.request.GenerationRequest`'s
fields, :func:`request_values`) and, under the config file's keys with the run's own (devices,
model, outputs), the same JSON config the command line runs, validated by the same code, plus the
server's ceilings. Every problem is one :class:`FormError` naming the form field it belongs
to, so the UI can show the CLI's one-line message next to that field. Imports neither torch nor
gradio.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any


from ..errors import ConfigError
from ..frames import partition_frames
from ..presets import PRESETS, resolve_engine
from ..run.config import RunConfig, config_data, devices_from_text, validate_run_config
from ..schedulers import SCHEDULER_NAMES

DEFAULT_SCHEDULER = "default"
"""The scheduler choice that leaves it to the model family (``pipe_configs.scheduler: null``)."""
DEFAULT_PRESET = "default"
"""The engine choice of the engine's own defaults (the method's published settings)."""


class FormError(ValueError):
    """A refused form: ``field`` is the :class:`GenerationForm` field it belongs to (None: the run as
    a whole), ``str(self)`` the one-line message (the CLI's, with its config path)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    """The server's ceilings, so a form cannot ask for a run the machine cannot hold."""

    max_frames: int = 2304
    max_side: int = 1024
    """Largest height or width, in pixels."""
    max_steps: int = 200
    max_cpu_processes: int = max(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class GenerationForm:
    """Everything the form asks; field names are the API endpoint's parameter names."""

    prompts: dict[int, str]
    """The timeline: ``{start_frame: prompt}`` (frame 0 required)."""
    num_frames: int = 16
    height: int = 64
    width: int = 64
    steps: int = 20
    devices: str = "1"
    """A number of CPU processes (``"2"``), or GPU ids (``"gpu:0,1"``), or the config's JSON list."""
    seed: int = 0
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    transition_frames: int = 0
    keyframe_mode: str = "hold"
    """``hold``: each prompt from its start frame, blended over ``transition_frames`` at each change;
    ``interpolate``: FreeNoise's blend from each keyframe to the next (``pipe_configs.keyframe_mode``)."""
    scheduler: str = DEFAULT_SCHEDULER
    model: str = ""
    """An embedded model's name (``demo``, ``demo-wan``), a diffusers folder or a hub id; empty: the
    embedded demo model."""
    base_model: str = ""
    preset: str = DEFAULT_PRESET
    engine_json: str = ""
    """Engine settings as the config's ``plugin_configs`` JSON; when given, used instead of the preset."""
    padding: int | None = None
    """Engine knobs over the preset (None: the preset's)."""
    top_k: int | None = None
    phase_t: float | None = None
    """Where the denoising phases switch (both phases' ``t``)."""
    phase_bias: float | None = None
    """The logit bias of each phase's favoured scope (0: no phases)."""
    loop: bool = False
    export_fps: int = 8
    checkpoint_every: int = 5
    """Save a checkpoint every this many steps (what Cancel keeps and Resume continues); 0: never."""
    image: str = ""
    """Image-to-video: the path of the video's first frame (``pipe_configs.image``); empty: none."""
    last_image: str = ""
    """Image-to-video: the path of the video's last frame (``pipe_configs.last_image``, first-last-frame
    models); empty: none."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompts"] = {str(k): v for k, v in self.prompts.items()}
        return data


FORM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GenerationForm))
FORM_IMAGES: tuple[str, ...] = ("image", "last_image")
"""The form's image uploads (paths; the run config's ``pipe_configs`` keys of the same names)."""

# A config error's path -> the form field that shows it.
_FIELD_OF_CONFIG_PATH: dict[str, str] = {
    "pipe_configs.prompts": "prompts",
    "pipe_configs.total_frames": "num_frames",
    "pipe_configs.num_frames": "num_frames",
    "pipe_configs.height": "height",
    "pipe_configs.width": "width",
    "pipe_configs.steps": "steps",
    "pipe_configs.guidance_scale": "guidance_scale",
    "pipe_configs.negative_prompt": "negative_prompt",
    "pipe_configs.transition_frames": "transition_frames",
    "pipe_configs.keyframe_mode": "keyframe_mode",
    "pipe_configs.scheduler": "scheduler",
    "pipe_configs.export_fps": "export_fps",
    "pipe_configs.checkpoint_every": "checkpoint_every",
    "pipe_configs.image": "image",
    "pipe_configs.last_image": "last_image",
    "devices": "devices",
    "seed": "seed",
    "model": "model",
    "base_model": "base_model",
    "plugin_configs.attn.padding": "padding",
    "plugin_configs.attn.top_k": "top_k",
    "plugin_configs.attn.local_phase": "phase_t",
    "plugin_configs.attn.global_phase": "phase_t",
    "plugin_configs.loop": "loop",
    "plugin_configs": "engine_json",
}


EMBEDDED_MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "demo": {"num_frames": 16, "height": 64, "width": 64, "steps": 20, "guidance_scale": 5.0,
             "scheduler": DEFAULT_SCHEDULER, "preset": DEFAULT_PRESET},
    # Wan: 4k + 1 frames (17: 5 latent frames), the "wan" preset's window and global frames, the folder's sampler.
    "demo-wan": {"num_frames": 17, "height": 64, "width": 64, "steps": 20, "guidance_scale": 5.0,
                 "scheduler": DEFAULT_SCHEDULER, "preset": "wan"},
}
"""The form values that choosing an embedded model in the model field puts in: a video the model
was trained for that a laptop CPU makes in seconds (the rest of the form stays as it is)."""


def model_choices() -> list[tuple[str, str]]:
    """The model field's choices, ``(label, value)``: each embedded model by name (empty, or a folder
    or hub id typed in, is also accepted)."""
    from ..demo import EMBEDDED_MODELS  # no torch

    return [(f"{name}: {model.description}", name) for name, model in EMBEDDED_MODELS.items()]


def embedded_model_settings(model: str) -> dict[str, Any]:
    """What choosing ``model`` in the form sets besides the model ({} for a folder or hub id)."""
    return dict(EMBEDDED_MODEL_SETTINGS.get(str(model).strip(), {}))


def field_of(message: str) -> str | None:
    """The form field a CLI/config message (``<config path>: <problem>``) belongs to, if any."""
    path = message.split(":", 1)[0].strip()
    while path:
        if path in _FIELD_OF_CONFIG_PATH:
            return _FIELD_OF_CONFIG_PATH[path]
        path = path.rpartition(".")[0]
    return None


def parse_devices(text: str | int, limits: Limits) -> list[Any]:
    """``"2"`` -> two CPU processes; ``"gpu:0,1"`` (or ``cuda:0,1``) -> GPUs 0 and 1; a JSON list
    (``["cpu", "cpu"]``, ``[0, 1]``) as in a config file."""
    devices = _read_devices(str(text).strip())
    cpu = isinstance(devices, list) and bool(devices) and all(d == "cpu" for d in devices)
    if cpu and len(devices) > limits.max_cpu_processes:
        raise FormError("devices", f"devices: at most {limits.max_cpu_processes} CPU processes on this server, "
                                   f"got {len(devices)} (serve --max-cpu-processes raises it)")
    return devices


def _read_devices(raw: str) -> Any:
    try:
        return devices_from_text(raw)  # the command line's --devices
    except ConfigError as exc:
        raise FormError("devices", str(exc)) from None


def parse_timeline(text: str | dict[Any, Any] | list[Any], num_frames: int) -> dict[int, str]:
    """The API's timeline: JSON text ``{"0": "...", "8": "..."}``; a JSON list of prompts starts
    them where a config file's list segments start (held, with ``keyframe_mode`` "hold", that is
    the list's video); plain text is one prompt."""
    if isinstance(text, (dict, list)):
        value: Any = text
    else:
        raw = str(text).strip()
        if not raw:
            raise FormError("prompts", "pipe_configs.prompts: no prompt given (e.g. {\"0\": \"a red circle moving right\"})")
        if not raw.startswith(("{", "[")):
            return {0: raw}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise FormError("prompts", f"pipe_configs.prompts: invalid JSON ({exc.msg} at column {exc.colno}); "
                                       'expected {"0": "first prompt", "8": "second prompt"}') from None
    if isinstance(value, list):
        if not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise FormError("prompts", "pipe_configs.prompts: a list of prompts must hold non-empty texts")
        segments = partition_frames(num_frames, min(len(value), num_frames)) if num_frames >= 1 else [range(0)]
        return {segment.start: p.strip() for segment, p in zip(segments, value)}
    if not isinstance(value, dict):
        raise FormError("prompts", 'pipe_configs.prompts: expected a {"start frame": "prompt"} object')
    timeline: dict[int, str] = {}
    for key, prompt in value.items():
        start = str(key).strip()
        if not start.lstrip("-").isdigit():
            raise FormError("prompts", f"pipe_configs.prompts: start frames must be numbers, got {key!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise FormError("prompts", f"pipe_configs.prompts: frame {start}: the prompt must be non-empty text")
        if int(start) in timeline:
            raise FormError("prompts", f"pipe_configs.prompts: frame {int(start)} is given twice")
        timeline[int(start)] = prompt.strip()
    return timeline


def timeline_from_rows(rows: list[tuple[Any, Any]]) -> dict[int, str]:
    """The UI's timeline rows ``(start frame, prompt)``; rows without a prompt are skipped."""
    timeline: dict[int, str] = {}
    for start, prompt in rows:
        text = (prompt or "").strip()
        if not text:
            continue
        if start is None or start == "":
            raise FormError("prompts", f"pipe_configs.prompts: the row {text[:40]!r} has no start frame")
        frame = int(float(start))
        if frame in timeline:
            raise FormError("prompts", f"pipe_configs.prompts: frame {frame} is given twice")
        timeline[frame] = text
    if not timeline:
        raise FormError("prompts", "pipe_configs.prompts: no prompt given (e.g. \"a red circle moving right\" at frame 0)")
    return timeline


def form_from_values(timeline: dict[int, str], values: dict[str, Any]) -> GenerationForm:
    """A form from loosely typed widget or API values (numbers may come as floats, text or None)."""
    def config_path(name: str) -> str:
        return next((path for path, field in _FIELD_OF_CONFIG_PATH.items() if field == name), name)

    def whole(name: str, value: Any, optional: bool) -> int | None:
        if value is None or value == "":
            if optional:
                return None
            raise FormError(name, f"{config_path(name)}: a number is required")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise FormError(name, f"{config_path(name)}: must be a number, got {value!r}") from None
        if not number.is_integer():
            raise FormError(name, f"{config_path(name)}: must be a whole number, got {value}")
        return int(number)

    converted: dict[str, Any] = {}
    for spec in fields(GenerationForm):
        if spec.name == "prompts" or spec.name not in values:
            continue
        value, kind = values[spec.name], spec.type
        if kind in ("int", "int | None"):
            converted[spec.name] = whole(spec.name, value, optional=kind != "int")
        elif kind in ("float", "float | None"):
            if value is None or value == "":
                if kind == "float":
                    raise FormError(spec.name, f"{config_path(spec.name)}: a number is required")
                converted[spec.name] = None
            else:
                converted[spec.name] = float(value)
        elif kind == "bool":
            converted[spec.name] = bool(value)
        else:
            converted[spec.name] = "" if value is None else str(value)
    return GenerationForm(prompts=timeline, **converted)


def _engine(form: GenerationForm) -> dict[str, Any]:
    engine: dict[str, Any]
    if form.engine_json.strip():
        try:
            engine = json.loads(form.engine_json)
        except ValueError as exc:
            raise FormError("engine_json", f"plugin_configs: invalid JSON ({exc.msg} at line {exc.lineno}, column "
                                           f"{exc.colno}); clear it to use the preset") from None
        if not isinstance(engine, dict):
            raise FormError("engine_json", "plugin_configs: expected a JSON object such as {\"attn\": {\"padding\": 8}}")
    elif form.preset == DEFAULT_PRESET:
        engine = {}
    else:
        try:  # the knobs below go over the preset's settings
            engine = resolve_engine(form.preset).model_dump(mode="json")
        except ValueError:
            raise FormError("preset", f"plugin_configs: unknown engine preset {form.preset!r} "
                                      f"(choose one of {[DEFAULT_PRESET, *sorted(PRESETS)]})") from None
    attn = engine.setdefault("attn", {})
    if form.padding is not None:
        attn["padding"] = form.padding
    if form.top_k is not None:
        attn["top_k"] = form.top_k
    if form.phase_bias is not None and form.phase_bias == 0:
        attn["local_phase"] = attn["global_phase"] = None
    elif form.phase_t is not None or form.phase_bias is not None:
        base = RunConfig.model_fields["plugin_configs"].default.attn
        t = form.phase_t if form.phase_t is not None else base.local_phase.t
        bias = form.phase_bias if form.phase_bias is not None else base.local_phase.local_bias
        attn["local_phase"] = {"t": t, "local_bias": bias, "global_bias": 0}
        attn["global_phase"] = {"t": t, "local_bias": 0, "global_bias": bias}
    if form.loop:
        engine["loop"] = True
    return engine


def _check_limits(form: GenerationForm, limits: Limits) -> None:
    if form.num_frames > limits.max_frames:
        raise FormError("num_frames", f"pipe_configs.total_frames: at most {limits.max_frames} frames on this server, "
                                      f"got {form.num_frames} (serve --max-frames raises it)")
    for name in ("height", "width"):
        value = getattr(form, name)
        if value > limits.max_side:
            raise FormError(name, f"pipe_configs.{name}: at most {limits.max_side} pixels on this server, got {value} "
                                  "(serve --max-side raises it)")
    if form.steps > limits.max_steps:
        raise FormError("steps", f"pipe_configs.steps: at most {limits.max_steps} steps on this server, got {form.steps} "
                                 "(serve --max-steps raises it)")


def request_values(form: GenerationForm, template: RunConfig | None = None) -> dict[str, Any]:
    """The generation request the form asks for, by :class:`~video_infinity.request.GenerationRequest`
    field (``template``: the server's ``--config``, for what the form does not ask: fps, eta); the
    run config validates it as its request."""
    if form.scheduler not in (DEFAULT_SCHEDULER, *SCHEDULER_NAMES):
        raise FormError("scheduler", f"pipe_configs.scheduler: unknown {form.scheduler!r} "
                                     f"(choose one of {[DEFAULT_SCHEDULER, *SCHEDULER_NAMES]})")
    scheduler = None if form.scheduler == DEFAULT_SCHEDULER else form.scheduler
    pipe = template.pipe_configs if template is not None else None
    return {
        "prompt": {str(k): v for k, v in sorted(form.prompts.items())},
        "negative_prompt": form.negative_prompt.strip() or None, "num_frames": form.num_frames,
        "height": form.height, "width": form.width, "num_inference_steps": form.steps,
        "guidance_scale": float(form.guidance_scale), "seed": form.seed,
        "fps": pipe.fps if pipe is not None else None,
        "eta": pipe.eta if pipe is not None and scheduler == "ddim" else 0.0,
        "scheduler": scheduler, "transition_frames": form.transition_frames, "keyframe_mode": form.keyframe_mode,
        "engine": _engine(form),
        "image": form.image.strip() or None, "last_image": form.last_image.strip() or None,
    }


def run_config(form: GenerationForm, *, base_path: str, file_name: str, limits: Limits,
               template: RunConfig | None = None) -> RunConfig:
    """The run config of ``form``: its request (:func:`request_values`) under the config file's keys,
    with the run's own (devices, model, outputs), validated like a CLI config (``template``: the
    server's ``--config``, for what the form does not ask: dtype, port, timeouts, fps, eta, ...)."""
    _check_limits(form, limits)
    request = config_data(request_values(form, template))
    base = template.model_dump(mode="json", by_alias=False) if template is not None else {}
    pipe = dict(base.get("pipe_configs", {}))
    pipe.pop("num_frames", None)
    for name in (*FORM_IMAGES, "video"):  # the form's uploads, not the template's: an empty upload is no image
        pipe.pop(name, None)  # (and the form has no continuation video)
    pipe.update(request["pipe_configs"], export_fps=form.export_fps, file_name=file_name,
                checkpoint_every=form.checkpoint_every or None, save_latents=False)
    data = {
        **{k: v for k, v in base.items() if k not in ("pipe_configs", "plugin_configs")},
        **request,
        "devices": parse_devices(form.devices, limits),
        "base_path": base_path,
        "model": form.model.strip() or None,
        "base_model": form.base_model.strip() or None,
        "pipe_configs": pipe,
    }
    if "dtype" not in data:
        data["dtype"] = "float32"  # the CLI's float16 default is for GPUs; CPU ranks run float32 anyway
    try:
        return validate_run_config(data)
    except ConfigError as exc:
        raise FormError(field_of(str(exc)), str(exc)) from None


def form_from_config(config: RunConfig | dict[str, Any]) -> GenerationForm:
    """The form that gives ``config`` back (as far as the form reaches): "use these settings"."""
    if isinstance(config, dict):
        config = RunConfig.model_validate(config)
    pipe = config.pipe_configs
    prompts = pipe.prompts
    if isinstance(prompts, dict):
        timeline, mode = dict(prompts), pipe.keyframe_mode
    else:  # a list: its segments' starts, held (the same video)
        timeline, mode = parse_timeline(list(prompts), config.total_frames), "hold"
    cpu = config.uses_cpu
    return GenerationForm(
        prompts=timeline, num_frames=config.total_frames, height=pipe.height, width=pipe.width, steps=pipe.steps,
        devices=str(config.world_size) if cpu else "gpu:" + ",".join(str(d) for d in config.devices),
        seed=config.seed, guidance_scale=pipe.guidance_scale, negative_prompt=pipe.negative_prompt or "",
        transition_frames=pipe.transition_frames, keyframe_mode=mode, scheduler=pipe.scheduler or DEFAULT_SCHEDULER,
        model=config.model or "", base_model=config.base_model or "",
        engine_json=json.dumps(config.plugin_configs.model_dump(mode="json"), indent=1),
        loop=config.plugin_configs.loop,  # the knobs stay empty: the engine JSON holds them
        export_fps=pipe.export_fps, checkpoint_every=pipe.checkpoint_every or 0,
        image=pipe.image or "", last_image=pipe.last_image or "",  # as recorded: the file may be gone since
    )


__all__ = ["DEFAULT_PRESET", "DEFAULT_SCHEDULER", "EMBEDDED_MODEL_SETTINGS", "FORM_FIELDS", "FORM_IMAGES", "FormError",
           "GenerationForm", "Limits", "embedded_model_settings", "field_of", "form_from_config", "form_from_values",
           "model_choices", "parse_devices", "parse_timeline", "request_values", "run_config", "timeline_from_rows"]
