"""video-infinity: training-free distributed long video generation (Video-Infinity)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import AttentionConfig, EngineConfig, MotionConfig, PhaseConfig
from .errors import VideoInfinityError
from .request import GenerationRequest

if TYPE_CHECKING:
    from .context import ClipContext, FrameLayout
    from .engine.handle import ParallelHandle
    from .parallel import parallelize
    from .pipeline import VideoInfinityPipeline, VideoInfinityPipelineOutput
    from .video_io import export_to_video

__version__ = "0.1.0"

# Lazy: the CLI must reject a bad config without paying for importing torch and diffusers.
_LAZY = {
    "ClipContext": "context",
    "FrameLayout": "context",
    "ParallelHandle": "engine.handle",
    "parallelize": "parallel",
    "VideoInfinityPipeline": "pipeline",
    "VideoInfinityPipelineOutput": "pipeline",
    "export_to_video": "video_io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttentionConfig", "VideoInfinityError", "ClipContext", "EngineConfig", "GenerationRequest", "FrameLayout", "MotionConfig", "ParallelHandle", "PhaseConfig",
           "VideoInfinityPipeline", "VideoInfinityPipelineOutput", "export_to_video", "parallelize"]
