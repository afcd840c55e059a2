"""Demo models: tiny random and trained text-to-video models in diffusers layout.

:func:`default_model_path` is the model a run config without ``model`` uses: the tiny trained model
shipped in ``demo/weights/`` (trained here on procedural videos by :mod:`video_infinity.demo.train`),
or, when the package was built without it, a tiny random model built once into the user's cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""The shipped trained demo model (diffusers pipeline layout)."""

DEMO_RUN: dict[str, Any] = {
    "dtype": "float32",
    "devices": ["cpu"],
    "base_path": "./outputs",
    "pipe_configs": {"height": 64, "width": 64, "steps": 20, "guidance_scale": 5.0, "fps": 8, "scheduler": "dpmsolver++"},
}
"""What a command-line run starts from when it names neither a config file nor a model: the sizes and
sampling the demo model was trained for, on one CPU process (as ``examples/cpu_demo.json``)."""

RANDOM_MODEL_NAME = "random-demo-model"
_COMPONENTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and all((path / name).exists() for name in _COMPONENTS)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/video-infinity`` (default ``~/.cache/video-infinity``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "video-infinity"


def _random_model_path() -> Path:
    target = cache_dir() / RANDOM_MODEL_NAME
    if _is_model_folder(target):
        return target
    from .random_model import build_random_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{RANDOM_MODEL_NAME}.", dir=target.parent))
    try:
        build_random_model(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if a concurrent caller got there first
        except OSError:
            if not _is_model_folder(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """The folder of the demo model: the shipped trained one, else a cached random one (with a warning)."""
    if _is_model_folder(WEIGHTS_DIR):
        return WEIGHTS_DIR
    path = _random_model_path()
    logger.warning(
        "no trained demo model is shipped with this installation (%s is missing): using a tiny random "
        "model from %s, whose videos are noise", WEIGHTS_DIR, path,
    )
    return path


__all__ = ["DEMO_RUN", "WEIGHTS_DIR", "cache_dir", "default_model_path"]
