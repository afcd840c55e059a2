"""Images and video clips a request conditions on (image-to-video): what the request's ``image``,
``last_image`` and ``video`` fields take, how they are read, and how they are named in sidecars
and checkpoint fingerprints.

A source is a path (an image file, or a video file for ``video``) or an in-memory value: a PIL
image, an array or a tensor (as diffusers' ``WanImageToVideoPipeline`` takes them; a video: a list
of images, an (n, H, W, 3) array or a tensor). Paths are read with diffusers' ``load_image`` (EXIF
orientation applied, RGB) and PyAV. Imports neither torch nor PIL at module level: the request
schema uses it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["describe_source", "check_source", "is_path", "load_image", "load_video", "source_size", "video_length"]


def is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _in_memory_kind(value: Any) -> str | None:
    """What an in-memory source is ("image", "array", "tensor", "images"), or None if none."""
    module = type(value).__module__
    if module.startswith("PIL."):
        return "image"
    if module.startswith("numpy") and hasattr(value, "shape"):
        return "array"
    if module.startswith("torch") and hasattr(value, "shape"):
        return "tensor"
    if isinstance(value, (list, tuple)) and value and all(_in_memory_kind(v) in ("image", "array") for v in value):
        return "images"
    return None


def check_source(value: Any, *, video: bool = False) -> Any:
    """``value`` as the request keeps it: a path (the file must exist: a ``Path``), or an in-memory
    image, array, tensor or (``video``) list of images; ValueError with the fix otherwise."""
    if value is None:
        return None
    if is_path(value):
        path = Path(value).expanduser()
        if not str(value).strip():
            raise ValueError("must be a path to an image file, got an empty string")
        if not path.is_file():
            raise ValueError(f"no file at {str(value)!r} (give the path of an {'video' if video else 'image'} file)")
        return path
    kind = _in_memory_kind(value)
    if kind is None or (kind == "images" and not video):
        what = "a list of images, an (n, H, W, 3) array, a tensor" if video else "a PIL image, an array, a tensor"
        raise ValueError(f"must be a path, {what}; got {type(value).__name__}")
    return list(value) if kind == "images" else value


def _digest(value: Any) -> str:
    """A short content hash: the file's bytes, or the pixels of an in-memory source."""
    digest = hashlib.sha256()
    if isinstance(value, Path):
        with value.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    else:
        import numpy as np

        for item in value if isinstance(value, list) else [value]:
            if type(item).__module__.startswith("torch"):
                item = item.detach().cpu().float().numpy()
            array = np.ascontiguousarray(np.asarray(item))
            digest.update(f"{array.shape}:{array.dtype}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def describe_source(value: Any) -> str | None:
    """How a source is named in sidecars and checkpoint fingerprints: its path or kind, with a hash of
    its content (so that a changed file at the same path is another request)."""
    if value is None:
        return None
    if isinstance(value, Path):
        return f"{value} (sha256 {_digest(value)})"
    kind = _in_memory_kind(value) or type(value).__name__
    return f"in-memory {kind} (sha256 {_digest(value)})"


def _uint8_to_pil(value: Any) -> Any:
    """A uint8 (H, W, 3) array as the PIL image it is (diffusers' processors take float arrays as
    values in [0, 1] and would read 8-bit pixels as 0-255); anything else as is."""
    if _in_memory_kind(value) == "array" and str(value.dtype) == "uint8" and value.ndim == 3:
        from PIL import Image

        return Image.fromarray(value)
    return value


def load_image(value: Any, field: str) -> Any:
    """An image source as diffusers' pipelines take it: a path read as an RGB PIL image; a uint8
    (H, W, 3) array as a PIL image; other in-memory images as they are (float arrays and tensors in
    [0, 1], diffusers' convention). ValueError naming ``field`` when the file is not an image."""
    if not isinstance(value, Path):
        return _uint8_to_pil(value)
    from diffusers.utils import load_image as diffusers_load_image

    try:
        return diffusers_load_image(str(value))
    except Exception as exc:  # PIL raises several kinds for a file that is not an image
        raise ValueError(f"{field}: cannot read {str(value)!r} as an image ({type(exc).__name__}: {exc})") from None


def load_video(value: Any, field: str) -> Any:
    """A video source as diffusers' video processor takes it: a path, or a uint8 (n, H, W, 3) array,
    as a list of PIL images; a list's uint8 arrays as PIL images; other in-memory frames as they are."""
    if not isinstance(value, Path):
        if isinstance(value, list):
            return [_uint8_to_pil(frame) for frame in value]
        if _in_memory_kind(value) == "array" and str(value.dtype) == "uint8" and value.ndim == 4:
            return [_uint8_to_pil(frame) for frame in value]
        return value
    from .video_io import read_video

    try:
        frames, _ = read_video(value)
    except Exception as exc:  # PyAV raises several kinds for a file that is not a video
        raise ValueError(f"{field}: cannot read {str(value)!r} as a video ({type(exc).__name__}: {exc})") from None
    if len(frames) == 0:
        raise ValueError(f"{field}: {str(value)!r} holds no frames")
    return [_uint8_to_pil(frame) for frame in frames]


def video_length(video: Any) -> int:
    """Frames of a loaded video source: a list of images, an (n, H, W, C) array or (n, C, H, W) tensor,
    or a batch of one such video (5-D)."""
    if isinstance(video, list):
        return len(video)
    shape = tuple(video.shape)
    return shape[1] if len(shape) == 5 else shape[0]


def source_size(value: Any) -> tuple[int, int]:
    """(width, height) of a loaded image source (a PIL image, an (H, W, C) array, a (C, H, W) tensor)."""
    if type(value).__module__.startswith("PIL."):
        return tuple(value.size)  # type: ignore[return-value]
    shape = tuple(value.shape)
    if type(value).__module__.startswith("torch"):
        return shape[-1], shape[-2]
    return shape[-2], shape[-3]
