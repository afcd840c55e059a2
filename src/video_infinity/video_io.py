"""Video and image files: streaming H.264 MP4 writer, decoder, contact sheets, PNG; every write
atomic (:mod:`video_infinity.atomic`). ``export_to_video`` saves a pipeline's output.
"""

from __future__ import annotations

import io
import logging
import os
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

from .atomic import commit, temp_path, write_bytes_atomic

logger = logging.getLogger(__name__)

# Preferred H.264 encoders, software first (always usable), then hardware ones.
_H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "h264_qsv", "h264_amf", "h264_videotoolbox", "h264_v4l2m2m")


def _h264_encoder() -> str:
    available = av.codecs_available
    for name in _H264_ENCODERS:
        if name in available:
            try:
                av.codec.Codec(name, "w")  # listed is not always usable as an encoder
                return name
            except Exception:  # noqa: BLE001
                continue
    raise RuntimeError("no H.264 encoder is available in PyAV's ffmpeg build")


class VideoWriter:
    """Stream uint8 RGB frames into an H.264 (yuv420p) MP4, atomically.

    >>> with VideoWriter("out.mp4", width=512, height=320, fps=8) as w:
    ...     w.write(frames)  # (n, height, width, 3) uint8, as many calls as needed

    Frames are encoded as they arrive; the file appears at ``path`` only when the context exits
    normally. On an exception the temporary file is removed and ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike[str], width: int, height: int, fps: float, crf: int = 18) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size must be positive and even (yuv420p), got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.width, self.height, self.fps, self.crf = width, height, fps, crf
        self.frames_written = 0
        self._tmp: Path | None = None
        self._container: Any = None
        self._stream: Any = None

    def __enter__(self) -> VideoWriter:
        self._tmp = temp_path(self.path)
        try:
            codec = _h264_encoder()
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            rate = Fraction(self.fps).limit_denominator(1001)
            stream = self._container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.codec_context.time_base = 1 / rate
            # crf is libx264's quality knob; other encoders get a generous bit rate instead.
            if codec == "libx264":
                # One thread: with frame threads x264 varied more from encode to encode of the same
                # frames (7 different decodes of 12 in one process with 4 threads, 1 with one). It is
                # still not deterministic from process to process, so tests compare latents bit for
                # bit and decoded videos by PSNR.
                stream.options = {"crf": str(self.crf), "preset": "medium", "threads": "1"}
            else:
                stream.bit_rate = max(2_000_000, int(self.width * self.height * self.fps * 0.5))
            self._stream = stream
            logger.debug("writing %s with %s (%dx%d @ %s fps)", self.path, codec, self.width, self.height, rate)
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, frames: np.ndarray) -> None:
        """Encode ``frames``: uint8 array (n, height, width, 3) or a single (height, width, 3) frame."""
        if self._stream is None:
            raise RuntimeError("VideoWriter.write() called outside its `with` block")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected frames of shape (n, {self.height}, {self.width}, 3), got {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames, got {frames.dtype}")
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = self.frames_written
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames_written += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to {self.path}")
            for packet in self._stream.encode(None):  # flush the encoder's delayed frames
                self._container.mux(packet)
            self._container.close()
            self._container = None
            assert self._tmp is not None
            commit(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                pass
            self._container = None
        self._stream = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def read_video(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode every frame of the first video stream: ``(frames (n, H, W, 3) uint8, fps)``."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            return np.zeros((0, stream.height, stream.width, 3), np.uint8), float(rate or 0)
    return np.stack(frames), float(rate)


def contact_sheet(frames: np.ndarray, columns: int = 8, max_frames: int = 32) -> np.ndarray:
    """A grid of up to ``max_frames`` evenly spaced frames (row-major, black padding).

    Shape ``(rows * H, min(columns, k) * W, 3)`` where ``k`` frames are shown and
    ``rows = ceil(k / columns)``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"expected frames of shape (n, H, W, C) with n > 0, got {frames.shape}")
    if columns < 1 or max_frames < 1:
        raise ValueError("columns and max_frames must be positive")
    n, h, w, c = frames.shape
    picked = frames[np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))]
    k = len(picked)
    cols = min(columns, k)
    rows = -(-k // cols)
    sheet = np.zeros((rows * h, cols * w, c), dtype=frames.dtype)
    for i, frame in enumerate(picked):
        r, col = divmod(i, cols)
        sheet[r * h:(r + 1) * h, col * w:(col + 1) * w] = frame
    return sheet


def videos_sheet(videos: np.ndarray, frames_per_row: int = 8) -> np.ndarray:
    """One row per video of ``frames_per_row`` evenly spaced frames (see :func:`contact_sheet`)."""
    return np.concatenate([contact_sheet(v, columns=frames_per_row, max_frames=frames_per_row) for v in videos], axis=0)


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a uint8 image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as PNG (atomically)."""
    from PIL import Image  # Pillow: a diffusers dependency

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"expected a uint8 image (H, W[, 1|3|4]), got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def export_to_video(frames: Any, path: str | os.PathLike[str], fps: float = 8, overwrite: bool = False) -> Path:
    """Save a pipeline's ``frames[0]`` (float (n, H, W, 3) in [0, 1], uint8, a torch tensor of
    either, or a list of PIL images) as an H.264 MP4; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if isinstance(frames, list):
        frames = np.stack([np.asarray(image.convert("RGB")) for image in frames])
    elif hasattr(frames, "detach"):  # a torch tensor: (n, 3, H, W) as the "pt" output type gives it
        frames = frames.detach().cpu()
        frames = (frames.permute(0, 2, 3, 1) if frames.shape[1] == 3 and frames.shape[-1] != 3 else frames).numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps) as writer:
        writer.write(frames)
    return path
