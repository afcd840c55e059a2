"""The clip-parallel engine on a tiny random Wan transformer: equal to diffusers (whole window and
frame band), the same on 1-4 gloo ranks, global rotary positions, per-frame text, both experts."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from engine_utils import BLAS_ENVIRONMENTS, run_distributed, torch_threads
from video_infinity.context import ClipContext
from video_infinity import parallelize
from wan_utils import TEXT_DIM, band_reference, build_tiny_wan_transformer, save_tiny_wan_transformer

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
}
TIMESTEPS = {"dual_high_noise": 900.0, "dual_fused": 900.0}


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


def _rank_worker(rank: int, world_size: int, model_dir: str, inputs: dict) -> dict:
    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    return _run(model, ClipContext.from_process_group(total_frames=inputs["x"].shape[2]), inputs)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_engine")
    model_dir = save_tiny_wan_transformer(root / "transformer")
    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    inputs = _inputs()
    with torch.no_grad():
        plain = model(inputs["x"], torch.tensor([500.0]), inputs["text"]).sample
    band = band_reference(model, inputs["x"], torch.tensor([500.0]), inputs["text"], padding=2)
    # The ranks run with one thread each; so does the reference. (Bit-identity holds across rank
    # counts at a fixed thread count per rank: some of torch's CPU linears round differently with
    # another number of threads, e.g. the text projection.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = _run(model, ClipContext(total_frames=FRAMES), inputs)
    finally:
        torch.set_num_threads(threads)
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


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_agree_with_one_process(single, world_size):
    results = run_distributed(_rank_worker, world_size, single["model_dir"], single["inputs"], tmp_dir=single["root"])
    for name, expected in single["outputs"].items():
        got = torch.cat([r[name] for r in results], dim=2)
        if name.endswith("_fused"):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        else:  # split-invariant on CPU: bit for bit
            assert torch.equal(got, expected), f"{name}, world {world_size}: max diff {(got - expected).abs().max():.3g}"
    if world_size == 3:  # the acceptance check: 3 ranks against diffusers' processor under a band mask
        torch.testing.assert_close(torch.cat([r["band"] for r in results], 2), single["band"], atol=1e-5, rtol=0)


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
# window (every frame once, one more back than forward); global frames only across ranks.
LOOP_CASES = {
    "window_in_ring": (7, {"loop": True, **BAND}),
    "ring_in_window": (6, {"loop": True, "attn": {"padding": 5, "top_k": 0, "token_num_scale": True}}),
    "globals": (7, {"loop": True, **DUAL}),
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
def test_loop_is_roll_equivariant_and_equals_the_middle_of_the_video_tiled():
    """One process. The ring of T latent frames against an independent reference: diffusers'
    processor under a band mask on the video repeated 3 times (no loop): its middle copy lies T
    frames from the ends, beyond the 2 layers' reach of 2 frames each, so it sees ring neighbours
    at their ring distances -- in rotary positions too. (Keys across the wrap left at the angle of
    their own frame are off by 1e-3 here, and break the roll-equivariance.)"""
    model = build_tiny_wan_transformer()
    for name in ("window_in_ring", "ring_in_window"):
        total, settings = LOOP_CASES[name]
        inputs = _inputs(frames=total, seed=4)
        x, text = inputs["x"], inputs["text"]
        out = _run_loop(model, settings, x, text)
        for shift in (1, 3, total - 1):  # split-invariant (the CPU default): bit for bit
            rolled = _run_loop(model, settings, torch.roll(x, shift, 2), text)
            assert torch.equal(rolled, torch.roll(out, shift, 2)), (
                f"{name}, roll {shift}: max difference {(rolled - torch.roll(out, shift, 2)).abs().max():.3g}")
        fused = _run_loop(model, {**settings, "split_invariant": False}, x, text)  # absolute angles
        torch.testing.assert_close(fused, out, atol=1e-5, rtol=0)
        plain = _run_loop(model, {**settings, "loop": False}, x, text)
        # The video's ends see the other end now. A ring inside the window sees the same frames as
        # the whole window without a loop, only at other (ring) rotary distances: a smaller change.
        least = 1e-2 if name == "window_in_ring" else 1e-4
        for frame in (0, total - 1):
            assert (out[:, :, frame] - plain[:, :, frame]).abs().max() > least
    total, settings = LOOP_CASES["window_in_ring"]
    inputs = _inputs(frames=total, seed=4)
    x, text = inputs["x"], inputs["text"]
    tiled = band_reference(model, torch.cat([x] * 3, dim=2), torch.tensor([900.0]), text, padding=2)
    loop = _run_loop(model, settings, x, text)
    torch.testing.assert_close(loop, tiled[:, :, total : 2 * total], atol=1e-5, rtol=0)


def _loop_rank_worker(rank: int, world_size: int, model_dir: str, inputs: dict) -> dict:
    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    results = {}
    for name, (total, settings) in LOOP_CASES.items():
        ctx = ClipContext.from_process_group(total_frames=total)
        x = inputs[name]["x"][:, :, ctx.frames.start : ctx.frames.stop]
        results[name] = _run_loop(model, settings, x, inputs[name]["text"], ctx)
    return results


@pytest.mark.distributed
def test_loop_on_three_uneven_ranks_equals_one_process(single):
    inputs = {name: _inputs(frames=total, seed=5) for name, (total, _) in LOOP_CASES.items()}
    with torch_threads(1):  # as each rank
        expected = {name: _run_loop(single["model"], settings, inputs[name]["x"], inputs[name]["text"])
                    for name, (_, settings) in LOOP_CASES.items()}
    results = run_distributed(_loop_rank_worker, 3, single["model_dir"], inputs, tmp_dir=single["root"])
    for name in LOOP_CASES:  # clips 3+2+2 and 2+2+2
        got = torch.cat([r[name] for r in results], dim=2)
        assert torch.equal(got, expected[name]), f"{name}: max difference {(got - expected[name]).abs().max():.3g}"


ENV_FRAMES = 11


def _worlds_1_to_n(rank: int, world_size: int, model_dir: str, inputs: dict) -> dict:
    """This rank's output for every world 1..world_size (each on a subgroup of the first ranks), with
    per-frame text and one timestep per token (as Wan2.2 TI2V passes them)."""
    import torch.distributed as dist

    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    tokens = inputs["x"].shape[3] // 2 * inputs["x"].shape[4] // 2
    results = {}
    for world in range(1, world_size + 1):
        group = dist.new_group(list(range(world)))  # every rank takes part in creating each group
        if rank >= world:
            continue
        ctx = ClipContext(rank=rank, world_size=world, total_frames=ENV_FRAMES, group=group)
        own = ctx.frames
        handle = parallelize(model, DUAL, ctx)
        with torch.no_grad():
            t = torch.full((1, len(own) * tokens), 900.0)
            results[world] = model(inputs["x"][:, :, own.start : own.stop], t, inputs["text"][:, own.start : own.stop]).sample
        handle.remove()
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("environment", list(BLAS_ENVIRONMENTS))
def test_worlds_agree_bit_for_bit_whatever_the_blas_environment(tmp_path, environment):
    # A feed-forward of 36 channels: a latent frame's 6 x 36 activations are no multiple of a vector
    # width, so an element-wise non-linearity's scalar tail would move with the clip's size.
    model_dir = save_tiny_wan_transformer(tmp_path / "transformer", ffn_dim=36)
    g = torch.Generator().manual_seed(5)
    inputs = {"x": torch.randn(1, 4, ENV_FRAMES, 4, 6, generator=g),
              "text": torch.randn(1, ENV_FRAMES, 5, TEXT_DIM, generator=g)}
    env, threads = BLAS_ENVIRONMENTS[environment]
    results = run_distributed(_worlds_1_to_n, 4, str(model_dir), inputs, tmp_dir=tmp_path, threads=threads, env=env)
    reference = results[0][1]
    for world in (2, 3, 4):
        got = torch.cat([results[rank][world] for rank in range(world)], dim=2)
        assert torch.equal(got, reference), f"{environment}, world {world} vs 1: max diff {(got - reference).abs().max():.3g}"
