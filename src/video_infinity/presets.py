"""Named engine settings per model family: ``EngineConfig.model_validate(PRESETS[name])``.

``wan`` (Wan2.1 / Wan2.2 text-to-video, counted in latent frames): Wan2.1 was trained on 81-frame
clips, i.e. 21 latent frames attended jointly. A query frame at least 8 latent frames from both
ends of the video sees its own frame and 8 on each side (``padding`` 8: 17 local frames) plus the 4
global frames spread over the whole video (``top_k`` 4) when they lie outside that window: at most
21 latent frames, the trained number of keys per query (``token_num_scale`` stays off). Near the
ends the window is clipped and a global frame inside it is not counted twice, so there a query sees
fewer. The phase biases are the method's published ones (favour the global frames while t >= 800,
the local window below; Wan's flow-matching timesteps also run 0..1000). Global frames stay fixed
and rotary distances unclipped (``rotary_clip`` None), chosen from ``benchmarks/results/dit_settings.json``
(the trained demo-wan model, 8 seeds, 129 and 257 frames): rotating global frames followed the
prompt's direction as often as fixed ones (53% against 53% at 129 frames, 36% against 34% at 257),
clipping the distance to the trained range lost direction at both lengths (31% and 17%) and cost
25-41% more time, and local attention alone (``top_k`` 0) led at 257 frames only (58%), which one run
of 8 seeds on a model trained on 9-latent-frame clips does not justify dropping global frames for.
Unverified here: real Wan weights under these settings (none can be downloaded where this is built).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import EngineConfig

PRESETS: dict[str, dict[str, Any]] = {
    "wan": {"attn": {"padding": 8, "top_k": 4}},
}


def engine_preset(name: str) -> EngineConfig:
    """The engine settings of preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset: {unknown_preset(name)}")
    return resolve_engine(name)


def unknown_preset(name: str) -> str:
    """The message for a preset name that is not in :data:`PRESETS`."""
    return f"unknown preset {name!r}; give engine knobs or one of {sorted(PRESETS)}"


def resolve_engine(engine: EngineConfig | Mapping[str, Any] | str | None) -> EngineConfig:
    """Engine settings from what a caller gives: an :class:`EngineConfig` as is, the original's
    ``plugin_configs`` knobs, a preset's name, or None (the engine's defaults, the published
    settings). The one place where preset names are resolved (the Python call, the run config, the
    web form)."""
    if isinstance(engine, EngineConfig):
        return engine
    if isinstance(engine, str):
        if engine not in PRESETS:  # the field's name is the caller's to add (preset, plugin_configs, ...)
            raise ValueError(unknown_preset(engine))
        return EngineConfig.model_validate(PRESETS[engine])
    return EngineConfig.model_validate(engine or {})
