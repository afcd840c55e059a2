"""Named engine presets."""

from __future__ import annotations

import pytest

from video_infinity.config import EngineConfig
from video_infinity.presets import PRESETS, engine_preset


@pytest.mark.unit
def test_wan_preset_keeps_each_query_at_wans_training_length():
    config = engine_preset("wan")
    assert isinstance(config, EngineConfig)
    # own frame + padding on each side + global frames = 21 latent frames (81 video frames)
    assert 2 * config.attn.padding + 1 + config.attn.top_k == 21
    assert all(EngineConfig.model_validate(settings) for settings in PRESETS.values())
    with pytest.raises(ValueError, match="preset: unknown preset 'wan3'"):
        engine_preset("wan3")
