"""video-infinity: training-free distributed long video generation (Video-Infinity)."""

from .config import AttentionConfig, EngineConfig, PhaseConfig
from .context import ClipContext, FrameLayout
from .parallelize import ParallelHandle, parallelize

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "ClipContext",
    "EngineConfig",
    "FrameLayout",
    "ParallelHandle",
    "PhaseConfig",
    "parallelize",
]
