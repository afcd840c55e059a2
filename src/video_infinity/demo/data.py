"""Procedural training videos for the demo model: one coloured shape moving at constant speed.

Each video shows a single shape of fixed size (circle, square or triangle; red, green, blue or
yellow) on a plain grey background, moving left, right, up or down by :data:`SPEED` pixels a
frame and wrapping around the frame edges, so a video can be as long as wanted. The shape may drag
a fading motion trail (:data:`TRAIL`, as a long-exposure camera would show it), which makes the
direction of motion visible in every single frame. Everything is deterministic from a seed.
Captions read like ``"a red circle moving right"``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64
"""Frame height and width in pixels."""
SPEED = 4.0
"""Pixels per frame (one latent pixel of the x4 VAE)."""
SHAPE_SIZE = 16
"""Diameter of the circle, side of the square, height and base of the triangle (pixels)."""
Trail = tuple[tuple[float, float], ...]
TRAIL: Trail = ((2.0, 0.5), (4.0, 0.25))
"""Ghost copies behind the shape: (distance in frames' worth of motion, opacity)."""
NO_TRAIL: Trail = ()
BACKGROUND = (96, 96, 96)
"""Plain grey: zero saturation, so the object's colour mask is easy to take."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) per frame in units of SPEED; y grows downwards
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class VideoSpec:
    """What one video shows: colour, shape, direction and the shape's centre in frame 0 (pixels)."""

    colour: str
    shape: str
    direction: str
    x0: float
    y0: float

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction)

    def centre(self, frame: float) -> tuple[float, float]:
        """The shape's centre in ``frame`` (wrapped into [0, SIZE))."""
        dx, dy = DIRECTIONS[self.direction]
        return ((self.x0 + dx * SPEED * frame) % SIZE, (self.y0 + dy * SPEED * frame) % SIZE)


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def all_classes() -> list[tuple[str, str, str]]:
    """Every (colour, shape, direction) combination, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def caption_words() -> list[str]:
    """Every word a caption can contain."""
    return ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]


def random_spec(rng: np.random.Generator, classes: list[tuple[str, str, str]] | None = None) -> VideoSpec:
    classes = classes or all_classes()
    colour, shape, direction = classes[int(rng.integers(len(classes)))]
    x0, y0 = rng.uniform(0, SIZE, size=2)
    return VideoSpec(colour, shape, direction, float(x0), float(y0))


def scene_group(rng: np.random.Generator, colour: str, shape: str) -> list[VideoSpec]:
    """One scene moving each way: one spec per direction (DIRECTIONS order), all starting with the
    shape at the same random position in frame 0."""
    x0, y0 = rng.uniform(0, SIZE, size=2)
    return [VideoSpec(colour, shape, direction, float(x0), float(y0)) for direction in DIRECTIONS]


def _coverage(shape: str, cx: float, cy: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape centred at (cx, cy), wrap-around aware: (SIZE, SIZE)."""
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    coords = (np.arange(SIZE)[:, None] + offsets[None, :]).reshape(-1)  # sub-pixel sample positions
    # Signed distance to the centre on the torus, in [-SIZE/2, SIZE/2).
    dx = (coords[None, :] - cx + SIZE / 2) % SIZE - SIZE / 2
    dy = (coords[:, None] - cy + SIZE / 2) % SIZE - SIZE / 2
    half = SHAPE_SIZE / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        side = half * 0.9  # same area feel as the circle
        inside = (np.abs(dx) <= side) & (np.abs(dy) <= side)
    elif shape == "triangle":  # apex up, base down; centred on its bounding box
        rel = (dy + half) / SHAPE_SIZE  # 0 at the apex, 1 at the base
        inside = (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    fine = inside.astype(np.float32).reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE)
    return fine.mean(axis=(1, 3))


def _opacity(spec: VideoSpec, frame: float, trail: Trail) -> np.ndarray:
    """Opacity of the shape and its trail in ``frame``: float32 (SIZE, SIZE) in [0, 1]."""
    alpha = _coverage(spec.shape, *spec.centre(frame))
    for lag, opacity in trail:
        alpha = np.maximum(alpha, opacity * _coverage(spec.shape, *spec.centre(frame - lag)))
    return alpha


def render(spec: VideoSpec, frames: int, start: int = 0, trail: Trail = NO_TRAIL) -> np.ndarray:
    """Frames ``start .. start + frames - 1`` of the video: uint8 (frames, SIZE, SIZE, 3)."""
    background = np.asarray(BACKGROUND, np.float32)
    colour = np.asarray(COLOURS[spec.colour], np.float32)
    out = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    for i in range(frames):
        alpha = _opacity(spec, start + i, trail)[..., None]
        out[i] = np.round(background + alpha * (colour - background)).astype(np.uint8)
    return out


def shape_mask(spec: VideoSpec, frames: int, start: int = 0, trail: Trail = NO_TRAIL) -> np.ndarray:
    """Opacity of the shape (and its trail) in each frame, float32 (frames, SIZE, SIZE) in [0, 1]."""
    return np.stack([_opacity(spec, start + i, trail) for i in range(frames)])


def batch(rng: np.random.Generator, count: int, frames: int, classes: list[tuple[str, str, str]] | None = None,
          trail: Trail = NO_TRAIL) -> tuple[np.ndarray, list[VideoSpec]]:
    """``count`` random videos: uint8 (count, frames, SIZE, SIZE, 3) and their specs."""
    specs = [random_spec(rng, classes) for _ in range(count)]
    return np.stack([render(s, frames, trail=trail) for s in specs]), specs
