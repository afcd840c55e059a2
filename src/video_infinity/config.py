"""Validated configuration.

The engine knobs keep the original Video-Infinity ``plugin_configs`` names and nesting (including the
original's spelling ``local_biase``/``global_biase``), so an original config validates unchanged with
``EngineConfig.model_validate(original["plugin_configs"])``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a knob must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class PhaseConfig(_Strict):
    """Logit biases applied during one phase of denoising."""

    t: float = Field(ge=0)
    """Timestep threshold (diffusers scale, 0..1000)."""
    local_biase: float = 0.0
    """Added to the logits of the local-window keys while the phase is active."""
    global_biase: float = 0.0
    """Added to the logits of the global keys while the phase is active."""


class AttentionConfig(_Strict):
    """Dual-scope temporal attention (the original's ``plugin_configs.attn``)."""

    padding: int = Field(default=8, ge=0)
    """Local window: each query frame sees the frames within ``padding`` frames of itself."""
    top_k: int = Field(default=16, ge=0)
    """Number of global frames, spread evenly over the whole video and shared by every rank."""
    local_phase: PhaseConfig | None = PhaseConfig(t=800, local_biase=10, global_biase=0)
    """Active while the timestep t < ``local_phase.t`` (low noise: favour local context)."""
    global_phase: PhaseConfig | None = PhaseConfig(t=800, local_biase=0, global_biase=10)
    """Active while the timestep t >= ``global_phase.t`` (high noise: favour global context)."""
    token_num_scale: bool = False
    """Multiply the softmax scale by log(number of keys attended) / log(16)."""
    attn_scale: float = Field(default=1.0, gt=0)
    """Extra factor on the softmax scale (the original's ``attn_scale``)."""
    dynamic_scale: bool = True
    """Original key: switches the phase biases on (true) or off (false)."""
    dynamic_attn_tokens: bool = False
    """Original key: shrink the number of global frames with the timestep (top_k * t / 1000)."""
    top_k_chunk_size: int | None = Field(default=None, ge=1)
    """Original key, accepted for compatibility; it had no effect there either."""
    query_chunk_size: int = Field(default=64, ge=1)
    """Query frames processed at once; bounds attention memory, which stays linear in frames."""

    def phase_biases(self, timestep: float) -> tuple[float, float]:
        """(local bias, global bias) to add to the logits at ``timestep``."""
        local_bias = global_bias = 0.0
        if not self.dynamic_scale:
            return local_bias, global_bias
        if self.local_phase is not None and timestep < self.local_phase.t:
            local_bias += self.local_phase.local_biase
            global_bias += self.local_phase.global_biase
        if self.global_phase is not None and timestep >= self.global_phase.t:
            local_bias += self.global_phase.local_biase
            global_bias += self.global_phase.global_biase
        return local_bias, global_bias

    def global_frame_count(self, timestep: float) -> int:
        """Number of global frames used at ``timestep``."""
        if self.dynamic_attn_tokens:
            return int(self.top_k * max(0.0, min(timestep, 1000.0)) / 1000.0)
        return self.top_k


class Conv3dConfig(_Strict):
    """Original key ``conv_3d``: its plugin was disabled in the original; accepted and unused."""

    padding: int = Field(default=1, ge=0)


class ConvLayerConfig(_Strict):
    """Clip-parallel temporal convolutions (the original's ``conv_layer``)."""

    enabled: bool = True
    """Exchange halo frames with neighbouring clips. False makes each clip's temporal
    convolutions see only its own frames (zero padding at clip borders): for comparisons only."""


class EngineConfig(_Strict):
    """All engine knobs: the original ``plugin_configs`` plus ``norm_scope``."""

    attn: AttentionConfig = AttentionConfig()
    conv_layer: ConvLayerConfig = ConvLayerConfig()
    conv_3d: Conv3dConfig = Conv3dConfig()
    norm_scope: Literal["video", "clip"] = "video"
    """GroupNorm statistics of temporal modules over the whole ``video`` (exact, default) or
    over each rank's ``clip`` (as the original method did)."""
