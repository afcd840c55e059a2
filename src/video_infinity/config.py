"""The engine's configuration (the library's knobs): pydantic models, validated on construction.

They keep the original Video-Infinity ``plugin_configs`` nesting, so an original config validates
unchanged with ``EngineConfig.model_validate(original["plugin_configs"])``; the original's misspelt
keys ``local_biase``/``global_biase`` are accepted there as aliases of ``local_bias``/``global_bias``.
The command line's run configuration is :mod:`video_infinity.run.config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class _FieldError(ValueError):
    """Raised by model-level validators to name the field at fault (appended to the error's loc)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a knob must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, populate_by_name=True)


class PhaseConfig(_Strict):
    """Logit biases applied during one phase of denoising."""

    t: float = Field(ge=0)
    """Timestep threshold (diffusers scale, 0..1000)."""
    local_bias: float = Field(default=0.0, validation_alias=AliasChoices("local_bias", "local_biase"))
    """Added to the logits of the local-window keys while the phase is active (original key: ``local_biase``)."""
    global_bias: float = Field(default=0.0, validation_alias=AliasChoices("global_bias", "global_biase"))
    """Added to the logits of the global keys while the phase is active (original key: ``global_biase``)."""

    @property
    def local_biase(self) -> float:
        """The original's spelling of ``local_bias`` (read-only alias, for code written against it)."""
        return self.local_bias

    @property
    def global_biase(self) -> float:
        """The original's spelling of ``global_bias`` (read-only alias)."""
        return self.global_bias


class AttentionConfig(_Strict):
    """Dual-scope temporal attention (the original's ``plugin_configs.attn``)."""

    padding: int = Field(default=8, ge=0)
    """Local window: each query frame sees the frames within ``padding`` frames of itself."""
    top_k: int = Field(default=16, ge=0)
    """Number of global frames, spread evenly over the whole video and shared by every rank."""
    local_phase: PhaseConfig | None = PhaseConfig(t=800, local_bias=10, global_bias=0)
    """Active while the timestep t < ``local_phase.t`` (low noise: favour local context)."""
    global_phase: PhaseConfig | None = PhaseConfig(t=800, local_bias=0, global_bias=10)
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
    query_chunk_size: int | None = Field(default=None, ge=1)
    """Query frames per attention call; bounds attention memory, which stays linear in frames. None:
    64 with fused kernels (one call covers a usual clip), 16 split-invariant: there the calls are
    blocks aligned to the video and a rank computes every block its clip touches, rows it does not
    own as zeros, so a block longer than the clip costs the rank memory and work for frames it does
    not own (with 64, a 16-frame clip of a 64-frame video computed all 64 rows)."""
    rotary_clip: int | None = Field(default=None, ge=1)
    """Models with rotary positions (Wan) only, in latent frames: a query of latent frame q sees a key
    of latent frame k at the temporal rotary distance clamp(k - q, -rotary_clip, rotary_clip) (sign
    kept; FreeLOC-style re-encoding of long distances into the trained range), local and global keys
    alike (in a loop: the ring distance of a local key); the spatial rotary channels are unchanged.
    Exact and split-invariant. A clip reaching the video's longest distance (``rotary_clip >= latent
    frames - 1``) changes nothing and is computed as without it. None (default): the model's own
    distances. Unmeasured: its effect on quality awaits the benchmark. Refused for families without
    rotary positions (UNet3D, AnimateDiff)."""
    global_frames: Literal["fixed", "rotating"] = "fixed"
    """Which frames are the ``top_k`` global frames. ``fixed`` (default): the same evenly spread
    indices at every step. ``rotating`` (LVSA-style): at denoising step s (0: the schedule's first,
    also after a resume) the fixed indices shifted by s frames, modulo the video's frames, so every
    frame serves as a global frame over the run; the same on every rank. Unmeasured: its effect on
    quality awaits the benchmark."""

    kernel: Literal["auto", "flex", "sdpa"] = "auto"
    """DiTs (Wan) with a band window, where the engine computes with fused kernels (not
    split-invariant): how a chunk of query latent frames attends its window and the global frames.
    ``sdpa``: one fused attention call per query latent frame. ``flex``: one FlexAttention call per
    chunk (a block mask of the band and the global keys, the phase biases as a score modification),
    compiled by ``torch.compile`` on CUDA (needs Triton; the first call compiles for seconds, and a
    new chunk length may compile again), torch's unfused reference elsewhere (it holds the whole
    score matrix: for tests). ``auto`` (default): ``flex`` on CUDA where Triton is found, and on the
    meta device (the planner counts what a GPU runs); ``sdpa`` elsewhere. Measured on one H200 at
    Wan2.1-1.3B size, 81 frames (``gpu_wan.json``, ``band_attention.json``): a whole call with the
    ``wan`` preset 1.5x faster with ``flex`` (0.83 s against 1.26), one layer's band attention 1.6-1.8x.
    The same result up to float rounding. Split-invariant computing (CPU default) keeps its own
    frame-aligned calls: ``flex`` is refused with ``split_invariant: true``."""

    def phase_biases(self, timestep: float) -> tuple[float, float]:
        """(local bias, global bias) to add to the logits at ``timestep``."""
        local_bias = global_bias = 0.0
        if not self.dynamic_scale:
            return local_bias, global_bias
        if self.local_phase is not None and timestep < self.local_phase.t:
            local_bias += self.local_phase.local_bias
            global_bias += self.local_phase.global_bias
        if self.global_phase is not None and timestep >= self.global_phase.t:
            local_bias += self.global_phase.local_bias
            global_bias += self.global_phase.global_bias
        return local_bias, global_bias

    def global_frame_count(self, timestep: float) -> int:
        """Number of global frames used at ``timestep``."""
        if self.dynamic_attn_tokens:
            return int(self.top_k * max(0.0, min(timestep, 1000.0)) / 1000.0)
        return self.top_k

    def query_chunk(self, split_invariant: bool) -> int:
        """Query frames per attention call in the given mode (``query_chunk_size``, or its default)."""
        if self.query_chunk_size is not None:
            return self.query_chunk_size
        return 16 if split_invariant else 64


def rotary_clip_refusal(family: str) -> str:
    """The one line refusing ``attn.rotary_clip`` for a family whose temporal attention has no rotary
    positions (the caller prefixes the field's parent, e.g. ``plugin_configs.``)."""
    return (f"attn.rotary_clip applies to models with rotary positions (Wan); the {family} family's temporal "
            "attention has none: leave attn.rotary_clip unset (null)")


class Conv3dConfig(_Strict):
    """Original key ``conv_3d``: its plugin was disabled in the original; accepted and unused."""

    padding: int = Field(default=1, ge=0)


class ConvLayerConfig(_Strict):
    """Clip-parallel temporal convolutions (the original's ``conv_layer``)."""

    enabled: bool = True
    """Exchange halo frames with neighbouring clips. False makes each clip's temporal
    convolutions see only its own frames (zero padding at clip borders): for comparisons only."""


class MotionConfig(_Strict):
    """How motion modules see a video longer than the clips they were trained on."""

    window_frames: int = Field(default=16, ge=1)
    """Frames of each key window: the clip length the motion adapter was trained on (16 for
    AnimateDiff v1-v3). Must not exceed the motion modules' position table (32)."""
    query_block_frames: int = Field(default=4, ge=1)
    """Query frames that share one key window. Positions cost nothing per window (they are added to
    projections made once per frame), so this trades only kernel calls (fewer, larger with bigger
    blocks) against how well centred each query sits in its window (positions (L-B)/2 .. (L+B)/2-1)."""

    @model_validator(mode="after")
    def _block_fits_window(self) -> "MotionConfig":
        if self.query_block_frames > self.window_frames:
            raise _FieldError(
                "query_block_frames",
                f"query_block_frames ({self.query_block_frames}) must be <= window_frames ({self.window_frames})"
            )
        return self


class EngineConfig(_Strict):
    """All engine knobs: the original ``plugin_configs`` plus ``norm_scope``."""

    attn: AttentionConfig = AttentionConfig()
    conv_layer: ConvLayerConfig = ConvLayerConfig()
    conv_3d: Conv3dConfig = Conv3dConfig()
    motion: MotionConfig = MotionConfig()
    """AnimateDiff (``UNetMotionModel``) only: the key windows of the motion modules' temporal attention."""
    norm_scope: Literal["video", "clip"] = "video"
    """GroupNorm statistics of temporal modules over the whole ``video`` (exact, default) or
    over each rank's ``clip`` (as the original method did)."""
    split_invariant: bool | None = None
    """Compute every frame the same way whatever other frames share its rank, so a video is
    bit-identical on any number of ranks (true): operations whose shapes are fixed by each frame
    alone (spatial layers one frame per call, temporal layers one frame's rows per call, temporal
    attention as fused attention over query blocks aligned to the video, with zeros for the rows and
    keys a call does not hold), GroupNorm statistics in float64, fixed-size VAE decode chunks. False: torch's fused kernels, faster, the same up to rounding. Default (null): true on
    CPU, false on GPUs, whose kernels pick their algorithms by shape anyway."""

    block_tokens: int | Literal["auto"] | None = "auto"
    """DiTs (Wan): a transformer block's token-wise work (norms, modulation, projections,
    cross-attention, feed-forward) and the output head run this many tokens at a time, in whole
    latent frames (at least one), with the clip's keys and values kept once per layer, so a call's
    working memory per latent frame is about 3x the hidden state whatever the video's length.
    Chunks are as few as this allows and of even length. ``auto`` (default): chunks whose hidden
    states hold at most 50,331,648 values (3 x 2^24), so the chunk's memory is the same whatever the
    model's width: 32,768 tokens at width 1,536 (Wan2.1-1.3B; 21 latent frames at 480x832, an
    81-frame clip in one chunk), 16,384 at 3,072 (Wan2.2-TI2V-5B), 9,830 at 5,120 (14B). Fewer chunks
    are faster: each runs every kernel of a block again (one H200, an 81-frame Wan2.1-1.3B call,
    ``gpu_profile.json``: 0.661 s in one chunk, 0.677 in three of 16,384 tokens, 0.630 with null).
    null: the whole clip at once (diffusers' own forward; several times the memory). The same result
    up to float rounding; split-invariant: bit for bit."""

    loop: bool = False
    """Seamless loop: the frames are on a ring, the last frame's next frame is the first. Temporal
    convolutions take their halo frames across the wrap (circular padding in time, on one process
    too), local attention windows are taken modulo the number of frames (never a frame twice; with
    2 * padding + 1 >= frames every frame once), global frames stay at their fixed indices and
    GroupNorm is over the whole video as without a loop. Without global frames the model is then
    exactly equivariant to rolling the video in time. On Wan (latent frames) a key across the wrap
    gets the rotary angle of its unwrapped position, so rotary distances are ring distances. Needs
    ``conv_layer.enabled``."""

    @field_validator("block_tokens", mode="before")
    @classmethod
    def _block_tokens(cls, value: Any) -> Any:
        # one message for the union's three kinds (pydantic would name each member type)
        if value is None or value == "auto":
            return value
        try:
            tokens = int(value) if not isinstance(value, (bool, float)) else None
        except (TypeError, ValueError):
            tokens = None
        if tokens is None or tokens < 1:
            raise ValueError(f"a number of tokens >= 1, auto or null, got {value!r}")
        return tokens

    @model_validator(mode="after")
    def _flex_is_fused(self) -> EngineConfig:
        if self.attn.kernel == "flex" and self.split_invariant:
            raise _FieldError(
                "attn",
                "kernel: flex is a fused kernel and split_invariant: true asks for frame-aligned calls "
                "(bit-identical across ranks): set attn.kernel to auto or sdpa, or split_invariant to false",
            )
        return self

    @model_validator(mode="after")
    def _loop_needs_conv_halos(self) -> EngineConfig:
        if self.loop and not self.conv_layer.enabled:
            raise _FieldError(
                "loop",
                "needs temporal convolution halos to close the ring (set conv_layer.enabled to true or loop to false)",
            )
        return self

    def split_invariant_on(self, device_type: str) -> bool:
        """Whether the engine computes split-invariantly on a device of this type ("cpu", "cuda", ...)."""
        return self.split_invariant if self.split_invariant is not None else device_type == "cpu"

    def flex_on(self, device_type: str) -> bool:
        """Whether a DiT's band attention runs as one FlexAttention call per query chunk on a device
        of this type (``attn.kernel: flex``; never split-invariantly)."""
        if self.split_invariant_on(device_type) or self.attn.kernel == "sdpa":
            return False
        if self.attn.kernel == "flex":
            return True
        from .engine.flex import flex_available  # torch, imported only when asked

        return device_type in ("cuda", "meta") and flex_available(device_type)
