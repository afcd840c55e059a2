"""Quality probe for demo videos: track the coloured object, report its colour and motion, and how
far it jumps across clip borders and across the wrap (last frame back to the first, which is what a
seamless loop must make smooth) compared with its ordinary step inside a clip.

The object is the set of saturated pixels (the demo's background is grey); its position in each frame
is the wrap-around-aware (circular) mean of the mask, and the step between two frames is the
displacement taken on the torus, so an object leaving one edge and entering the other moves by its
ordinary step, not by the frame width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import COLOURS, DIRECTIONS

SATURATION_MIN = 0.35
VALUE_MIN = 0.2
MIN_PIXELS = 6
"""Frames whose mask has fewer pixels than this count as "object not found"."""
STILL_SPEED = 0.5
"""Below this many pixels a frame the object is reported as ``still``."""


def _hsv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of uint8 RGB frames."""
    rgb = frames.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    delta = high - low
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    return hue, saturation, high


def _reference_hues() -> dict[str, float]:
    hues = {}
    for name, rgb in COLOURS.items():
        hue, _, _ = _hsv(np.asarray(rgb, np.uint8)[None, None])
        hues[name] = float(hue[0, 0])
    return hues


def _hue_distance(a: np.ndarray | float, b: float) -> np.ndarray:
    d = np.abs(np.asarray(a) - b) % 360
    return np.minimum(d, 360 - d)


def object_mask(frames: np.ndarray) -> np.ndarray:
    """Boolean (n, H, W): the saturated (object) pixels."""
    _, saturation, value = _hsv(frames)
    return (saturation >= SATURATION_MIN) & (value >= VALUE_MIN)


def _circular_mean(weights: np.ndarray, axis_len: int, axis: int) -> float:
    profile = weights.sum(axis=axis)
    angles = 2 * np.pi * (np.arange(axis_len) + 0.5) / axis_len
    s, c = float((profile * np.sin(angles)).sum()), float((profile * np.cos(angles)).sum())
    return (math.atan2(s, c) / (2 * np.pi) * axis_len - 0.5) % axis_len


def track(frames: np.ndarray) -> np.ndarray:
    """Object centre (x, y) in pixels per frame, wrap-around aware; NaN where no object is found."""
    frames = np.asarray(frames)
    mask = object_mask(frames)
    n, height, width = mask.shape
    out = np.full((n, 2), np.nan)
    for i in range(n):
        if mask[i].sum() >= MIN_PIXELS:
            weights = mask[i].astype(np.float64)
            out[i] = (_circular_mean(weights, width, 0), _circular_mean(weights, height, 1))
    return out


def steps(centres: np.ndarray, width: int, height: int) -> np.ndarray:
    """Displacement (dx, dy) from each frame to the next, taken the short way round the torus."""
    d = np.diff(centres, axis=0)
    size = np.asarray([width, height], np.float64)
    return (d + size / 2) % size - size / 2


def classify_colour(frames: np.ndarray) -> tuple[str | None, float]:
    """The demo colour nearest to the object's median hue, and the fraction of object pixels near it."""
    hue, _, _ = _hsv(frames)
    mask = object_mask(frames)
    if mask.sum() < MIN_PIXELS:
        return None, 0.0
    hues = hue[mask]
    refs = _reference_hues()
    votes = {name: int((_hue_distance(hues, ref) < 25).sum()) for name, ref in refs.items()}
    best = max(votes, key=votes.get)
    return best, votes[best] / len(hues)


def classify_direction(velocity: tuple[float, float]) -> str:
    """``right``/``left``/``up``/``down`` by the dominant axis of the velocity, or ``still``."""
    vx, vy = velocity
    if not (math.isfinite(vx) and math.isfinite(vy)) or math.hypot(vx, vy) < STILL_SPEED:
        return "still"
    for name, (dx, dy) in DIRECTIONS.items():
        if (abs(vx) >= abs(vy) and dx == math.copysign(1, vx) and dy == 0) or (
            abs(vy) > abs(vx) and dy == math.copysign(1, vy) and dx == 0
        ):
            return name
    return "still"  # pragma: no cover


def clip_borders(total_frames: int, clip_frames: int | None = None, ranks: int | None = None,
                 temporal_compression: int = 1) -> list[int]:
    """First frame of every clip but the first, from a clip size or a number of ranks.

    With ``ranks``, the model's frames are split as the engine splits them: video frames for a
    UNet (``temporal_compression`` 1); for Wan (4) the ``(total_frames - 1) / 4 + 1`` latent frames,
    latent frame 0 decoding to video frame 0 and latent frame L >= 1 to video frames 4L - 3 .. 4L,
    so a clip starting at latent frame L starts at video frame 4(L - 1) + 1 (ValueError when
    ``total_frames`` is no such count)."""
    if clip_frames:
        return list(range(clip_frames, total_frames, clip_frames))
    if ranks and ranks > 1:
        from ..frames import latent_frame_count, partition_frames

        step = temporal_compression
        if step < 1:
            raise ValueError(f"temporal compression must be a positive number, got {step}")
        try:
            frames = total_frames if step == 1 else latent_frame_count(total_frames, step)
        except ValueError:
            raise ValueError(f"{total_frames} frames are not {step}k + 1, so the video was not split in latent frames "
                             f"of {step} (temporal compression {step}); probe it with temporal compression 1") from None
        return [part.start if step == 1 else step * (part.start - 1) + 1 for part in partition_frames(frames, ranks)[1:]]
    return []


def sidecar_temporal_compression(video_path: str | Path) -> int | None:
    """Video frames per latent frame of the run that made ``video_path``, from its sidecar
    (``<name>.json`` beside it: its ``temporal_compression``, or derived from ``total_frames`` and
    ``frames_per_rank`` for sidecars written before that key); None without a readable sidecar."""
    sidecar = Path(video_path).with_suffix(".json")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("temporal_compression"), int) and data["temporal_compression"] >= 1:
        return int(data["temporal_compression"])
    total, per_rank = data.get("total_frames"), data.get("frames_per_rank")
    if not isinstance(total, int) or not isinstance(per_rank, list) or not all(isinstance(n, int) for n in per_rank):
        return None
    latents = sum(per_rank)
    if latents == total:
        return 1
    if latents > 1 and (total - 1) % (latents - 1) == 0:
        return (total - 1) // (latents - 1)
    return None


@dataclass
class ProbeReport:
    """What the probe found in one video."""

    frames: int
    width: int
    height: int
    found_frames: int
    colour: str | None
    colour_fraction: float
    direction: str
    velocity: tuple[float, float]
    median_step: float
    borders: list[int] = field(default_factory=list)
    border_jumps: list[float] = field(default_factory=list)
    max_border_jump: float | None = None
    border_ratio: float | None = None
    """Largest jump at a clip border / median step inside clips."""
    wrap_jump: float | None = None
    """The object's step from the last frame back to the first (pixels, the short way round)."""
    wrap_ratio: float | None = None
    """``wrap_jump`` / median step inside clips: about 1 for a seamless loop."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyse(frames: np.ndarray, clip_frames: int | None = None, ranks: int | None = None,
            temporal_compression: int = 1) -> ProbeReport:
    """Probe ``frames`` (n, H, W, 3) uint8; clip borders from ``clip_frames`` or ``ranks`` (optional;
    ``temporal_compression``: see :func:`clip_borders`)."""
    frames = np.asarray(frames)
    n, height, width, _ = frames.shape
    borders = clip_borders(n, clip_frames, ranks, temporal_compression)
    centres = track(frames)
    found = int(np.isfinite(centres[:, 0]).sum())
    colour, fraction = classify_colour(frames)
    d = steps(centres, width, height) if n > 1 else np.zeros((0, 2))
    crossing = np.zeros(len(d), bool)
    for b in borders:
        if 0 < b <= len(d):
            crossing[b - 1] = True  # the step from frame b-1 (end of a clip) to frame b
    inside = d[~crossing]
    valid_inside = inside[np.isfinite(inside).all(axis=1)]
    velocity = tuple(float(v) for v in np.median(valid_inside, axis=0)) if len(valid_inside) else (math.nan, math.nan)
    median_step = float(np.median(np.hypot(*valid_inside.T))) if len(valid_inside) else math.nan
    jumps = [float(np.hypot(*d[b - 1])) for b in borders if 0 < b <= len(d)]
    finite_jumps = [j for j in jumps if math.isfinite(j)]
    max_jump = max(finite_jumps) if finite_jumps else None
    ratio = _per_step(max_jump, median_step)
    wrap = float(np.hypot(*steps(centres[[-1, 0]], width, height)[0])) if n > 1 else math.nan
    wrap_jump = wrap if math.isfinite(wrap) else None
    return ProbeReport(
        frames=n, width=width, height=height, found_frames=found, colour=colour, colour_fraction=fraction,
        direction=classify_direction(velocity), velocity=velocity, median_step=median_step,
        borders=borders, border_jumps=jumps, max_border_jump=max_jump, border_ratio=ratio,
        wrap_jump=wrap_jump, wrap_ratio=_per_step(wrap_jump, median_step),
    )


def _per_step(jump: float | None, median_step: float) -> float | None:
    return jump / max(median_step, 1e-6) if jump is not None and math.isfinite(median_step) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")" if value else "-"
    return str(value)


def format_report(report: ProbeReport, name: str = "") -> str:
    """A small two-column table for people."""
    rows = [
        ("video", name or "-"),
        ("frames", f"{report.frames} ({report.width}x{report.height}), object found in {report.found_frames}"),
        ("colour", f"{_fmt(report.colour)} ({report.colour_fraction:.0%} of object pixels)"),
        ("direction", report.direction),
        ("velocity (px/frame)", _fmt(report.velocity)),
        ("median step in clips (px)", _fmt(report.median_step)),
        ("clip borders", _fmt(report.borders)),
        ("jumps at borders (px)", _fmt(report.border_jumps)),
        ("max jump / median step", _fmt(report.border_ratio)),
        ("wrap: last -> first frame (px)", _fmt(report.wrap_jump)),
        ("wrap jump / median step", _fmt(report.wrap_ratio)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def inspect_video(path: str, clip_frames: int | None = None, ranks: int | None = None,
                  as_json: bool = False, contact_sheet_path: str | None = None,
                  temporal_compression: int | None = None) -> str:
    """Decode the video at ``path``, probe it, and return the report as a table or JSON text;
    ``contact_sheet_path``: also write a PNG grid of 32 evenly spaced frames there.
    ``temporal_compression`` (for ``ranks``' borders; Wan: 4): None reads it from the video's
    sidecar (``<name>.json`` beside it), else 1."""
    from ..video_io import contact_sheet, read_video, write_png

    if temporal_compression is None:
        temporal_compression = (sidecar_temporal_compression(path) or 1) if ranks and ranks > 1 else 1
    frames, _ = read_video(path)
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames")
    clip_borders(len(frames), clip_frames, ranks, temporal_compression)  # a bad split: refused before any file is written
    if contact_sheet_path is not None:
        write_png(contact_sheet_path, contact_sheet(frames, columns=8, max_frames=32))
    report = analyse(frames, clip_frames=clip_frames, ranks=ranks, temporal_compression=temporal_compression)
    if as_json:
        return json.dumps({"video": str(path), **report.to_dict()}, indent=2, default=str)
    return format_report(report, str(path))
