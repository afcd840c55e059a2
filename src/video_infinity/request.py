"""The one schema of a generation request: what video to make, declared once.

:class:`GenerationRequest` holds every parameter that determines a video (prompts, length, size,
sampling, seed, engine settings), each with its check and its docstring. Its field names are
diffusers' call keywords (``prompt``, ``num_frames``, ``num_inference_steps``, ``guidance_scale``).
Who uses it:

* the Python call, :meth:`video_infinity.pipeline.VideoInfinityPipeline.__call__`, validates its
  keywords through it (model-specific checks, such as Wan's size multiple, follow there);
* the command line's run config (:mod:`video_infinity.run.config`) maps the original
  Video-Infinity JSON keys onto it (``pipe_configs.steps`` -> ``num_inference_steps``, ...), takes
  its key definitions from it, and hands ``RunConfig.request`` to the ranks; ``generate``'s flags
  are generated from its fields;
* the web form (:mod:`video_infinity.ui.form`) builds one;
* the sidecar records its dump and the checkpoint hash is taken from it.

A problem is one ``ValueError`` line naming the field (:func:`request_error`). Imports no torch.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from .config import EngineConfig, _FieldError
from .images import check_source, describe_source
from .presets import resolve_engine
from .schedulers import SchedulerName

__all__ = ["GenerationRequest", "KeyframeMode", "format_validation_error", "request_error", "request_field"]

KeyframeMode = Literal["interpolate", "hold"]
NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompt_form(value: Any) -> Any:
    # Checked by hand: the union of a string, a list and a dict gives unreadable errors.
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, Mapping):
        if not value:
            raise ValueError('the {"frame": "prompt"} dict is empty (give at least {"0": "..."})')
        keys: dict[int, str] = {}
        for key, prompt in value.items():
            text = str(key).strip()
            if isinstance(key, bool) or not text.isdigit():
                raise ValueError(f"keys must be frame numbers (0, 1, ...), got {_short(key)}")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"frame {text}: the prompt must be a non-empty string, got {_short(prompt)}")
            if int(text) in keys:
                raise ValueError(f"frame {int(text)} is given twice")
            keys[int(text)] = prompt
        if 0 not in keys:
            raise ValueError('a {"frame": "prompt"} dict needs a prompt for frame 0')
        return dict(sorted(keys.items()))
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f'must hold at least 1 prompt (a list, or a {{"frame": "prompt"}} dict), got {_short(value)}')
    return value


def _multiple_of_8(value: Any) -> Any:
    # The VAE downsamples by 8: other sizes cannot be encoded exactly (a family may need more, e.g.
    # Wan's 16, checked by the pipeline once the model is known).
    if isinstance(value, int) and not isinstance(value, bool) and (value <= 0 or value % 8):
        lower, upper = max(8, value // 8 * 8), max(8, value // 8 * 8 + 8)
        hint = f"use e.g. {lower} or {upper}" if lower != upper and value > 8 else "use e.g. 8"
        raise ValueError(f"must be a positive multiple of 8, got {value} ({hint})")
    return value


def _engine(value: Any) -> Any:
    # Preset names are resolved in one place (video_infinity.presets.resolve_engine); knobs are
    # validated as the field's EngineConfig, so that their errors keep their path.
    return resolve_engine(value) if isinstance(value, str) else value


ImageSource = Annotated[Any, BeforeValidator(check_source), PlainSerializer(describe_source, when_used="json")]
VideoSource = Annotated[Any, BeforeValidator(lambda value: check_source(value, video=True)),
                        PlainSerializer(describe_source, when_used="json")]
Prompt = Annotated[list[NonEmptyText] | dict[int, NonEmptyText] | str, BeforeValidator(_prompt_form)]
Side = Annotated[int, BeforeValidator(_multiple_of_8)]


class GenerationRequest(BaseModel):
    """One video to make: every parameter that determines it, checked on construction."""

    # Strict: "30" for steps or true for a height is a mistake, not a value; unknown keys are errors.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)

    prompt: Prompt
    """Text prompt: one string; a list, spread over the video as consecutive segments of (nearly)
    equal length; or FreeNoise's ``{frame: prompt}`` keyframes (frame 0 required, every key a frame
    of the video; see ``keyframe_mode``)."""
    negative_prompt: str | None = None
    """What the video should not show (classifier-free guidance's unconditional text); None: empty."""
    num_frames: int = Field(ge=1)
    """Frames of the whole video, however many devices share it."""
    height: Side = 320
    """Frame height in pixels, a positive multiple of 8 (16 for Wan)."""
    width: Side = 512
    """Frame width in pixels, a positive multiple of 8 (16 for Wan)."""
    num_inference_steps: int = Field(default=30, ge=1)
    """Number of denoising steps."""
    guidance_scale: float = Field(default=12.0, ge=0, allow_inf_nan=False)
    """Classifier-free guidance scale (<= 1: no unconditional pass)."""
    fps: int | None = Field(default=None, ge=1)
    """Frame-rate conditioning value, for fps-conditioned UNets such as VideoCrafter2; None: 24."""
    seed: int | None = None
    """Random seed; the same seed gives the same video on any number of devices. None (the Python
    call): drawn at random, the same on every rank."""
    scheduler: SchedulerName | None = None
    """Sampler; None: the model family's default (``sde-dpmsolver++`` for UNet3D models, what the
    original's published runs used; ``model``, the folder's own flow-matching UniPC, for Wan)."""
    eta: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """DDIM's eta (0: deterministic); only used by the ``ddim`` scheduler."""
    transition_frames: int = Field(default=0, ge=0)
    """Frames over which the text embeddings of neighbouring prompts are blended (a list of
    prompts, or keyframes with ``keyframe_mode`` ``hold``)."""
    keyframe_mode: KeyframeMode = "interpolate"
    """How ``{frame: prompt}`` keyframes spread: ``interpolate`` (FreeNoise: the embedding goes
    linearly from each keyframe to the next) or ``hold`` (each prompt holds from its frame until the
    next keyframe, ``transition_frames`` frames blending across each change)."""
    loop: bool | None = None
    """A seamless loop: the frames on a ring, the last flowing into the first (see
    ``EngineConfig.loop``); None: the engine settings' choice."""
    engine: Annotated[EngineConfig | None, BeforeValidator(_engine)] = None
    """Engine settings: the original's ``plugin_configs`` knobs or a preset's name (``"wan"``, see
    :mod:`video_infinity.presets`); None: the pipeline's own."""
    image: ImageSource = None
    """Image-to-video: the video's first frame, a path to an image file (or, from Python, a PIL image,
    an array or a tensor, as diffusers takes them), resized to ``height`` x ``width``; None: from text
    only. For image-to-video models (Wan I2V, Wan2.2 TI2V)."""
    last_image: ImageSource = None
    """Image-to-video: the video's last frame (first-last-frame models, Wan2.2 A14B I2V); needs ``image``."""
    video: VideoSource = None
    """Continuation: the first frames of the video, e.g. the last seconds of an earlier one (a video
    file, or from Python a list of images, an (n, H, W, 3) array or a tensor); the rest is generated
    to follow them. Instead of ``image``."""

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        if isinstance(self.prompt, dict):
            late = [frame for frame in self.prompt if frame >= self.num_frames]
            if late:
                raise _FieldError("prompt", f"keyframe {late[0]} is past the video's last frame (keyframes are "
                                            f"frames in [0, {self.num_frames}): the video has {self.num_frames} frames)")
        if self.eta and self.scheduler != "ddim":
            raise _FieldError("eta", f"only used by the 'ddim' scheduler, got scheduler {self.scheduler!r} (set eta to 0)")
        if self.loop and self.engine is not None and not self.engine.conv_layer.enabled:
            raise _FieldError("loop", "needs temporal convolution halos to close the ring (set "
                                      "engine.conv_layer.enabled to true or loop to false)")
        if self.last_image is not None and self.image is None and self.video is None:
            raise _FieldError("last_image", "needs image (the first frame) too")
        if self.video is not None and self.image is not None:
            raise _FieldError("video", "the given frames start the video: give video or image, not both")
        if self.engine is not None and self.loop is not None and self.engine.loop != self.loop:
            # One form for one video: the engine settings say what loop says (as a config file's do).
            return self.model_copy(update={"engine": self.engine_for(self.engine)})
        return self

    @property
    def first_prompt(self) -> str:
        """The prompt the video starts with."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def engine_for(self, default: EngineConfig) -> EngineConfig:
        """The engine settings of this request: its own or ``default``, with ``loop`` applied."""
        engine = self.engine if self.engine is not None else default
        if self.loop is not None and self.loop != engine.loop:  # validated again: a loop needs the conv halos
            engine = EngineConfig.model_validate({**engine.model_dump(), "loop": self.loop})
        return engine

    @classmethod
    def checked(cls, **values: Any) -> GenerationRequest:
        """Validate ``values``; a problem is a one-line ``ValueError`` naming the field."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise request_error(exc) from None


def request_field(name: str, **changes: Any) -> Any:
    """The definition of request field ``name`` (its type checks, default and docstring), for a
    model that takes it under another key (the original config file's ``steps`` is
    ``num_inference_steps``). ``changes``: attributes to change, e.g. the file's own ``default``."""
    field: FieldInfo = copy.copy(GenerationRequest.model_fields[name])
    for attribute, value in changes.items():
        setattr(field, attribute, value)
    return field


def format_validation_error(exc: ValidationError, models: Mapping[str, type[BaseModel]] | None = None) -> str:
    """One line for the first error of ``exc``: ``<field path>: <problem> (<fix>)``. ``models``:
    class name -> class, to list the allowed keys when one is unknown (default: the request)."""
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
        model: type[BaseModel] | None = (models or {GenerationRequest.__name__: GenerationRequest}).get(exc.title)
        for part in loc[:-1]:  # follow the path to the model holding the unknown key (list indices skipped)
            if model is None or isinstance(part, int):
                continue
            spec = model.model_fields.get(part)
            candidates = [] if spec is None else [spec.annotation, *get_args(spec.annotation)]
            model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        allowed = list((model or BaseModel).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: unknown key, allowed keys: {', '.join(allowed)}{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if isinstance(cause, ValueError):
        return f"{where}: {cause}"
    return f"{where}: {error['msg'].rstrip('.')}, got {_short(error.get('input'))}"


def request_error(exc: ValidationError) -> ValueError:
    """The one-line ``ValueError`` for a refused request, naming the field."""
    return ValueError(format_validation_error(exc))
