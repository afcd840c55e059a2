"""Demo models: tiny trained text-to-video models embedded in the package, by name.

:data:`EMBEDDED_MODELS` names them: ``"demo"``, the UNet3D model in ``demo/weights/`` (trained here
on procedural videos by :mod:`video_infinity.demo.train`; what a run config without ``model`` uses),
and ``"demo-wan"``, the Wan-architecture model in ``demo/weights_wan/`` (a ``WanPipeline`` folder,
trained by :mod:`video_infinity.demo.train_wan`). :func:`resolve_model` is the one place where a
model as a user gives it (None, a name, a folder, a hub id) becomes what the loaders take; each
model's run defaults (:attr:`EmbeddedModel.run`) are what a command-line run without a config
file starts from. When the package was built without ``demo/weights/``, ``"demo"`` falls back to a
tiny random model built once into the user's cache (its videos are noise); ``"demo-wan"`` has no
such fallback and is refused in one line.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = _HERE / "weights"
"""The embedded UNet3D demo model, ``"demo"`` (diffusers pipeline layout)."""
WAN_WEIGHTS_DIR = _HERE / "weights_wan"
"""The embedded Wan-architecture demo model, ``"demo-wan"`` (a ``WanPipeline`` folder)."""

DEMO_RUN: dict[str, Any] = {
    "dtype": "float32",
    "devices": ["cpu"],
    "base_path": "./outputs",
    "pipe_configs": {"height": 64, "width": 64, "steps": 20, "guidance_scale": 5.0, "fps": 8, "scheduler": "dpmsolver++"},
}
"""What a command-line run starts from when it names neither a config file nor a model (or names
``--model demo``): the sizes and sampling the demo model was trained for, on one CPU process (as
``examples/cpu_demo.json``)."""

DEMO_WAN_RUN: dict[str, Any] = {
    "dtype": "float32",
    "devices": ["cpu"],
    "base_path": "./outputs",
    # 33 frames: the 9 latent frames of the model's training clips (a Wan video has 4k + 1 frames, so
    # the per-device default of 24 would be refused); the scheduler is the folder's flow-matching UniPC.
    "pipe_configs": {"height": 64, "width": 64, "total_frames": 33, "steps": 20, "guidance_scale": 5.0, "fps": 8,
                     "scheduler": "model"},
}
"""What ``video-infinity generate --model demo-wan`` starts from without a config file: 64x64, 33
frames, 20 steps, guidance 5, the folder's own scheduler, on one CPU process (engine settings: the
engine's defaults unless the flags or ``--set`` give some; ``examples/cpu_demo_wan.json`` uses the
``"wan"`` preset)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside the package, selectable by :attr:`name` wherever a model is given."""

    name: str
    path: Path
    """Its folder in the installed package."""
    components: tuple[str, ...]
    """What the folder holds when the package was built with it (checked before use)."""
    run: dict[str, Any] = field(default_factory=dict)
    """The run config a command-line run without a config file starts from (before flags and ``--set``)."""
    description: str = ""

    def is_present(self) -> bool:
        """Whether this installation holds the model's folder with every component."""
        return self.path.is_dir() and all((self.path / name).exists() for name in self.components)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "demo": EmbeddedModel(
        "demo", WEIGHTS_DIR, ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"), DEMO_RUN,
        "tiny UNet3D text-to-video model, 64x64 (the default)"),
    "demo-wan": EmbeddedModel(
        "demo-wan", WAN_WEIGHTS_DIR, ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
        DEMO_WAN_RUN, "tiny Wan-architecture text-to-video model, 64x64, 4k + 1 frames"),
}
"""The embedded models by name: ``"demo"`` (UNet3D, the default) and ``"demo-wan"`` (Wan)."""
DEFAULT_MODEL = "demo"
"""The embedded model a run without ``model`` uses."""

RANDOM_MODEL_NAME = "random-demo-model"
_DEMO_LIKE = re.compile(r"^demo(?:-[\w.-]*)?$")
"""A bare word that looks like an embedded model's name (refused when unknown instead of being
taken for a hub id, which would fail later with a less useful message)."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/video-infinity`` (default ``~/.cache/video-infinity``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "video-infinity"


def _random_model_path() -> Path:
    target = cache_dir() / RANDOM_MODEL_NAME
    if EmbeddedModel(RANDOM_MODEL_NAME, target, EMBEDDED_MODELS["demo"].components).is_present():
        return target
    from .random_model import build_random_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{RANDOM_MODEL_NAME}.", dir=target.parent))
    try:
        build_random_model(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if a concurrent caller got there first
        except OSError:
            if not EmbeddedModel(RANDOM_MODEL_NAME, target, EMBEDDED_MODELS["demo"].components).is_present():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """The folder of the default demo model (``"demo"``): the shipped trained one, else a cached
    random one (with a warning)."""
    return embedded_model_path(DEFAULT_MODEL)


def embedded_model_path(name: str) -> Path:
    """The folder of the embedded model ``name`` (a key of :data:`EMBEDDED_MODELS`).

    ``"demo"`` without its weights: a tiny random model (warned about). Any other model without its
    weights, or an unknown name: a one-line :class:`~video_infinity.errors.ModelLoadError`."""
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"model: unknown embedded model {name!r}; the embedded models are "
                             f"{', '.join(repr(n) for n in EMBEDDED_MODELS)} (or give a model folder or hub id)")
    if model.is_present():
        return model.path
    if name == DEFAULT_MODEL:
        path = _random_model_path()
        logger.warning(
            "no trained demo model is shipped with this installation (%s is missing): using a tiny random "
            "model from %s, whose videos are noise", model.path, path,
        )
        return path
    raise ModelLoadError(
        f"model: the embedded model {name!r} is not in this installation ({model.path} is missing or incomplete); "
        "install video-infinity from a source checkout that has its weights (pip install .), or give a model "
        "folder or hub id")


def embedded_name(model: str | os.PathLike[str] | None) -> str | None:
    """The embedded model ``model`` names: :data:`DEFAULT_MODEL` for None, the name for a string that
    is one of :data:`EMBEDDED_MODELS`' keys, else None (a folder or a hub id; a ``Path`` is always a path)."""
    if model is None:
        return DEFAULT_MODEL
    return model if isinstance(model, str) and model in EMBEDDED_MODELS else None


def embedded_run(model: str | None) -> dict[str, Any] | None:
    """The run defaults of the embedded model ``model`` names (None: the default one), a fresh copy;
    None when ``model`` is a folder or hub id."""
    name = embedded_name(model)
    return None if name is None else copy.deepcopy(EMBEDDED_MODELS[name].run)


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """The folder or hub id the loaders take for ``model`` as a user gives it: None is the default
    embedded model; an embedded model's name (``"demo"``, ``"demo-wan"``) is its folder; anything
    else is returned as given. The one place where model names are resolved (the Python call, the
    run config and its pre-flight, the web form, ``plan``).

    Precedence: a name wins over a local folder of the same name in the working directory (which is
    spelled ``./demo-wan``; a warning says so when one exists). A run config then means the same
    model from whichever directory it is run, and the embedded models keep one spelling that works
    everywhere, while a local folder always has another (``./NAME`` or its full path). A ``Path``
    object is taken as a path, never as a name. An unknown ``demo-...`` word that is no folder is
    refused in one line rather than looked up as a hub id."""
    name = embedded_name(model)
    if name is not None:
        if model is not None and Path(name).exists():
            logger.warning("model: %r is the embedded model; the local %s of that name is not used (give it as "
                           "./%s to use it)", name, "folder" if Path(name).is_dir() else "file", name)
        return str(embedded_model_path(name))
    text = os.fspath(model)  # type: ignore[arg-type]
    if isinstance(model, str) and _DEMO_LIKE.match(model) and not Path(model).exists():
        embedded_model_path(model)  # raises: unknown embedded model, naming the known ones
    return text


__all__ = ["DEFAULT_MODEL", "DEMO_RUN", "DEMO_WAN_RUN", "EMBEDDED_MODELS", "WAN_WEIGHTS_DIR", "WEIGHTS_DIR",
           "EmbeddedModel", "cache_dir", "default_model_path", "embedded_model_path", "embedded_name",
           "embedded_run", "resolve_model"]
