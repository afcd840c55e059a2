"""The clip-parallel engine on a tiny random Wan transformer: equal to diffusers (whole window and
frame band), global rotary positions, per-frame text, both experts, the loop against a tiled video.
Worlds 1-4 in every BLAS environment and the loop's roll-equivariance: test_conformance."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from video_infinity.context import ClipContext
from video_infinity import parallelize
from references import band_reference
from tiny_models import TEXT_DIM, build_tiny_wan_transformer, save_tiny_wan_transformer

FRAMES = 7  # latent frames: uneven clips on 2, 3 and 4 ranks
BAND = {"attn": {"padding": 2, "top_k": 0, "local_phase": None, "global_phase": None}}
DUAL = {"attn": {"padding": 1, "top_k": 2, "token_num_scale": True,
                 "local_phase": {"t": 800, "local_biase": 3}, "global_phase": {"t": 800, "global_biase": 3}}}
WHOLE = {"attn": {"padding": 1000, "top_k": 0}}
SETTINGS = {
    "whole": WHOLE,
    "band": BAND,
    "dual_high_noise": DUAL,  # global-phase bias (t >= 800)
    "band_fused": {**BAND, "split_invariant": False},
    "dual_fused": {**DUAL, "split_invariant": False},
    "band_flex": {"attn": {**BAND["attn"], "kernel": "flex"}, "split_invariant": False},
    "dual_flex": {"attn": {**DUAL["attn"], "kernel": "flex"}, "split_invariant": False},
}
TIMESTEPS = {"dual_high_noise": 900.0, "dual_fused": 900.0, "dual_flex": 900.0}


def _inputs(frames: int = FRAMES, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(1, 4, frames, 4, 6, generator=g), "text": torch.randn(1, 5, TEXT_DIM, generator=g)}


def _run(model: WanTransformer3DModel, ctx: ClipContext, inputs: dict) -> dict:
    """Every setting's output for the rank's frames."""
    own = ctx.frames
    outputs = {}
    for name, config in SETTINGS.items():
        handle = parallelize(model, config, ctx)
        t = torch.tensor([TIMESTEPS.get(name, 500.0)])
        with torch.no_grad():
            outputs[name] = model(inputs["x"][:, :, own.start : own.stop], t, inputs["text"]).sample
        handle.remove()
    return outputs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_engine")
    model_dir = save_tiny_wan_transformer(root / "transformer")
    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    inputs = _inputs()
    with torch.no_grad():
        plain = model(inputs["x"], torch.tensor([500.0]), inputs["text"]).sample
    band = band_reference(model, inputs["x"], torch.tensor([500.0]), inputs["text"], padding=2)
    outputs = _run(model, ClipContext(total_frames=FRAMES), inputs)
    return {"root": root, "model_dir": str(model_dir), "model": model, "inputs": inputs, "plain": plain,
            "band": band, "outputs": outputs}


@pytest.mark.unit
def test_whole_window_equals_diffusers_and_band_equals_masked_diffusers(single):
    out = single["outputs"]
    torch.testing.assert_close(out["whole"], single["plain"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["band"], single["band"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["band_fused"], single["band"], atol=1e-5, rtol=0)
    # Not a test that cannot fail: the band really changes the output, the dual scope differs again.
    assert (single["band"] - single["plain"]).abs().max() > 1e-2
    assert (out["dual_high_noise"] - out["band"]).abs().max() > 1e-2
    torch.testing.assert_close(out["dual_fused"], out["dual_high_noise"], atol=1e-5, rtol=0)
    # One FlexAttention call per chunk of query frames (torch's unfused reference on CPU).
    torch.testing.assert_close(out["band_flex"], single["band"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["dual_flex"], out["dual_high_noise"], atol=1e-5, rtol=0)


@pytest.mark.unit
def test_rotary_positions_are_global_latent_frames():
    # Rank 1 of 2 in a 6-latent-frame video owns frames 3..5: its rotary angles must be those rows
    # of the whole video's table. (Window 0, no global frames: nothing to exchange, no process group.)
    model = build_tiny_wan_transformer()
    captured = []
    model.rope.register_forward_hook(lambda module, args, output: captured.append(output))
    inputs = _inputs(frames=3)
    handle = parallelize(model, {"attn": {"padding": 0, "top_k": 0}}, ClipContext(rank=1, world_size=2, total_frames=6))
    with torch.no_grad():
        model(inputs["x"], torch.tensor([500.0]), inputs["text"])
    handle.remove()
    whole = model.rope(torch.zeros(1, 4, 6, 4, 6))
    tokens = 2 * 3
    for got, table in zip(captured[0], whole):
        assert torch.equal(got, table[:, 3 * tokens :])
    assert not torch.equal(captured[0][0], whole[0][:, : 3 * tokens])


@pytest.mark.unit
def test_more_latent_frames_than_the_rotary_table_is_an_error():
    model = build_tiny_wan_transformer(rope_max_seq_len=8)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        parallelize(model, WHOLE, ClipContext(rank=0, world_size=2, total_frames=9))
    handle = parallelize(model, WHOLE)  # no total: the input's length is checked at the call
    inputs = _inputs(frames=9)
    with pytest.raises(ValueError, match="rotary table"), torch.no_grad():
        model(inputs["x"], torch.tensor([500.0]), inputs["text"])
    handle.remove()


@pytest.mark.unit
def test_per_frame_text_gives_each_latent_frame_its_own_prompt():
    model = build_tiny_wan_transformer()
    inputs = _inputs(frames=4)
    other = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([500.0])
    band = {"attn": {"padding": 0, "top_k": 0}}  # frames independent: each must match a one-prompt run
    handle = parallelize(model, band)
    with torch.no_grad():
        first = model(inputs["x"], t, inputs["text"]).sample
        second = model(inputs["x"], t, other).sample
        per_frame = torch.stack([inputs["text"], inputs["text"], other, other], dim=1)  # (1, frames, seq, dim)
        mixed = model(inputs["x"], t, per_frame).sample
    handle.remove()
    torch.testing.assert_close(mixed[:, :, :2], first[:, :, :2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[:, :, 2:], second[:, :, 2:], atol=1e-5, rtol=0)
    assert (first - second).abs().max() > 1e-2


@pytest.mark.unit
def test_two_experts_are_parallelized_independently_and_removed():
    # Wan2.2 A14B: transformer and transformer_2, same context, each with its own handle.
    high, low = build_tiny_wan_transformer(seed=0), build_tiny_wan_transformer(seed=3)
    inputs = _inputs()
    t = torch.tensor([500.0])
    ctx = ClipContext(total_frames=FRAMES)
    with torch.no_grad():
        expected = [band_reference(m, inputs["x"], t, inputs["text"], padding=2) for m in (high, low)]
        plain = [m(inputs["x"], t, inputs["text"]).sample for m in (high, low)]
        handles = [parallelize(m, BAND, ctx) for m in (high, low)]
        for model, reference in zip((high, low), expected):
            torch.testing.assert_close(model(inputs["x"], t, inputs["text"]).sample, reference, atol=1e-5, rtol=0)
        for handle in handles:
            handle.remove()
        for model, reference in zip((high, low), plain):
            assert torch.equal(model(inputs["x"], t, inputs["text"]).sample, reference)


# ---------------------------------------------------------------- seamless loops (EngineConfig.loop)
# (frames, settings): a ring longer than the window, and a ring of even length shorter than the
# window (every frame once, one more back than forward).
LOOP_CASES = {
    "window_in_ring": (7, {"loop": True, **BAND}),
    "ring_in_window": (6, {"loop": True, "attn": {"padding": 5, "top_k": 0, "token_num_scale": True}}),
}


def _run_loop(model: WanTransformer3DModel, settings: dict, x: torch.Tensor, text: torch.Tensor,
              ctx: ClipContext | None = None, t: float = 900.0) -> torch.Tensor:
    handle = parallelize(model, settings, ctx or ClipContext(total_frames=x.shape[2]))
    try:
        with torch.no_grad():
            return model(x, torch.tensor([t]), text).sample
    finally:
        handle.remove()


@pytest.mark.unit
def test_loop_equals_the_middle_of_the_video_tiled():
    """One process. The ring of T latent frames against an independent reference: diffusers'
    processor under a band mask on the video repeated 3 times (no loop): its middle copy lies T
    frames from the ends, beyond the 2 layers' reach of 2 frames each, so it sees ring neighbours
    at their ring distances -- in rotary positions too. (Keys across the wrap left at the angle of
    their own frame are off by 1e-3 here, and break the roll-equivariance test_conformance checks.)"""
    model = build_tiny_wan_transformer()
    total, settings = LOOP_CASES["window_in_ring"]
    inputs = _inputs(frames=total, seed=4)
    x, text = inputs["x"], inputs["text"]
    tiled = band_reference(model, torch.cat([x] * 3, dim=2), torch.tensor([900.0]), text, padding=2)
    loop = _run_loop(model, settings, x, text)
    torch.testing.assert_close(loop, tiled[:, :, total : 2 * total], atol=1e-5, rtol=0)
    for name in ("window_in_ring", "ring_in_window"):  # the fused kernels use absolute angles: equal up to rounding
        total, settings = LOOP_CASES[name]
        inputs = _inputs(frames=total, seed=4)
        exact = _run_loop(model, settings, inputs["x"], inputs["text"])
        for kernel in ("sdpa", "flex"):
            fused = {**settings, "split_invariant": False, "attn": {**settings["attn"], "kernel": kernel}}
            torch.testing.assert_close(_run_loop(model, fused, inputs["x"], inputs["text"]), exact, atol=1e-5, rtol=0)


CHUNKED = {"whole": WHOLE, "band": BAND, "dual": DUAL, "band_fused": {**BAND, "split_invariant": False},
           "dual_fused": {**DUAL, "split_invariant": False}, "loop": {**BAND, "loop": True},
           "loop_fused": {**BAND, "loop": True, "split_invariant": False},
           "dual_flex": SETTINGS["dual_flex"], "loop_flex": {**SETTINGS["band_flex"], "loop": True}}


@pytest.mark.unit
@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("timesteps", ["per_call", "per_token"])
def test_frame_chunks_equal_the_whole_clip(single, name, timesteps):
    """Blocks and output head in chunks of 1, 2 and 3 latent frames (``block_tokens``) equal the whole
    clip at once (diffusers' forward under the same hooks): bit for bit when split-invariant, to float
    rounding on the fused kernels; with one timestep per call, and one per token (Wan2.2 TI2V: embedded
    once per latent frame, not per token, so to float rounding)."""
    model, inputs = single["model"], single["inputs"]
    x, text = inputs["x"], inputs["text"]
    tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
    t = torch.tensor([900.0]) if timesteps == "per_call" else torch.full((1, FRAMES * tokens), 900.0)
    outputs = {}
    for block_tokens in (None, tokens, 2 * tokens + 1, 3 * tokens):
        handle = parallelize(model, {**CHUNKED[name], "block_tokens": block_tokens}, ClipContext(total_frames=FRAMES))
        with torch.no_grad():
            outputs[block_tokens] = model(x, t, text).sample
        handle.remove()
    whole = outputs.pop(None)
    assert whole.abs().max() > 0.1
    for block_tokens, out in outputs.items():
        if "fused" in name or "flex" in name or timesteps == "per_token":  # other row counts (timestep rows) round differently
            torch.testing.assert_close(out, whole, atol=1e-5, rtol=0, msg=f"block_tokens {block_tokens}")
        else:
            assert torch.equal(out, whole), f"block_tokens {block_tokens}: {(out - whole).abs().max():.3g}"


@pytest.mark.unit
@pytest.mark.parametrize("frames", [0, 1, 5, 7, 21, 22, 81, 257])
@pytest.mark.parametrize("most", [1, 2, 3, 10, 21, 40])
def test_frame_chunks_are_few_and_even(frames, most):
    """At most ``most`` frames a chunk, as few chunks as that allows, lengths within one frame of each
    other, covering the frames once in order (21 frames of at most 10 are 7 + 7 + 7, not 10 + 10 + 1)."""
    from video_infinity.families.wan.blocks import frame_chunks

    tokens = 6
    chunks = list(frame_chunks(frames, tokens, most * tokens + tokens - 1))
    assert [f for chunk in chunks for f in chunk] == list(range(frames))
    assert len(chunks) == -(-frames // most)
    if chunks:
        lengths = [len(chunk) for chunk in chunks]
        assert max(lengths) <= most and max(lengths) - min(lengths) <= 1


@pytest.mark.unit
def test_block_tokens_auto_bounds_a_chunks_values_whatever_the_width():
    """``block_tokens: auto`` (the default): 32,768 tokens at Wan2.1-1.3B's width 1,536, 16,384 at
    Wan2.2-5B's 3,072; an integer is taken as it is; anything else is refused naming the field."""
    from pydantic import ValidationError

    from video_infinity.config import EngineConfig
    from video_infinity.families.wan.blocks import BLOCK_VALUES, chunk_tokens

    assert EngineConfig().block_tokens == "auto"
    assert (chunk_tokens("auto", 1536), chunk_tokens("auto", 3072), chunk_tokens("auto", 5120)) == (32768, 16384, 9830)
    assert chunk_tokens("auto", 2 * BLOCK_VALUES) == 1 and chunk_tokens(12, 1536) == 12
    assert EngineConfig(block_tokens=12).block_tokens == 12 and EngineConfig(block_tokens=None).block_tokens is None
    for bad in (0, "fast"):
        with pytest.raises(ValidationError, match="block_tokens"):
            EngineConfig(block_tokens=bad)


# The real transformers' widths (diffusers configs of Wan2.1-T2V-1.3B and Wan2.2-TI2V-5B), two layers:
# the memory that grows with the video is per layer (each block's keys and values are freed after it).
REAL_SIZE = {
    "Wan2.1-T2V-1.3B 480x832": (dict(num_attention_heads=12, ffn_dim=8960, in_channels=16, out_channels=16),
                                (60, 104), False, 24),
    "Wan2.2-TI2V-5B 704x1280, one timestep per token": (
        dict(num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48), (44, 80), True, 28),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", REAL_SIZE)
def test_memory_per_latent_frame_at_real_size_on_meta_tensors(name):
    """One transformer call at the real width on meta tensors (bf16 with diffusers' float32 modules, the
    engine's GPU defaults and the ``wan`` preset; the planner's own step): the working memory grows by at most the issue's bound per latent frame (MiB),
    against 73 and 168 MiB for diffusers' whole-clip blocks (measured the same way, here too)."""
    from video_infinity.families.wan.plan import meta_transformer, step_measure
    from video_infinity.presets import resolve_engine

    sizes, latent, per_token, bound = REAL_SIZE[name]
    model = meta_transformer(dict(attention_head_dim=128, num_layers=2, text_dim=4096, freq_dim=256,
                                  patch_size=(1, 2, 2), cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=1024, **sizes), torch.bfloat16)

    def peak(frames: int, block_tokens) -> int:
        engine = resolve_engine("wan")
        if block_tokens != "default":
            engine = engine.model_copy(update={"block_tokens": block_tokens})
        return step_measure(model, engine, ClipContext(total_frames=frames), latent, per_token,
                            guidance=False).peak_bytes

    def per_frame(block_tokens) -> float:
        return (peak(81, block_tokens) - peak(41, block_tokens)) / 40 / 2**20

    chunked, whole = per_frame("default"), per_frame(None)
    assert chunked <= bound, f"{chunked:.1f} MiB per latent frame"
    assert whole > 2.5 * bound, f"{whole:.1f} MiB per latent frame"  # the counter sees what chunking saves


@pytest.mark.unit
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_composes_with_the_engine(single, tmp_path, offload_type):
    """diffusers' group offloading (weights loaded by hooks just before each module runs), enabled
    before the engine's hooks: the same output as without offloading, with chunked blocks (the engine
    registers its hooks innermost, so the offloading's load runs before them).
    The groups are offloaded to disk, where an offloaded weight is an uninitialised tensor, so a
    module run before its group's hook loaded it would change the output."""
    model = WanTransformer3DModel.from_pretrained(single["model_dir"]).eval()
    x, text = single["inputs"]["x"], single["inputs"]["text"]
    engine = {**DUAL, "block_tokens": 12}
    handle = parallelize(model, engine, ClipContext(total_frames=FRAMES))
    with torch.no_grad():
        expected = model(x, torch.tensor([900.0]), text).sample
    handle.remove()
    model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type,
                               num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / "offload"))
    handle = parallelize(model, engine, ClipContext(total_frames=FRAMES))
    with torch.no_grad():
        out = model(x, torch.tensor([900.0]), text).sample
    handle.remove()
    assert expected.abs().max() > 0.1
    # Weights back from disk run other kernels' paths (diffusers' offloading alone differs by ~1e-6 here);
    # a module run on an unloaded (uninitialised) weight would be off by far more, or NaN.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
