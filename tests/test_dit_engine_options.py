"""Two engine options for DiTs (issue 26, item 3), unmeasured until the benchmark lands:
``attn.rotary_clip`` (a query sees every key at most R latent frames away in rotary angle, FreeLOC
style) and ``attn.global_frames: "rotating"`` (the global frames shift one frame per denoising step,
LVSA style). The pure rules, the clipped angles against a dense reference on a tiny Wan transformer,
a clip reaching the whole video equal to none bit for bit, the refusal for families without rotary
positions, and one process set of 3 gloo ranks: both options on 1 and 3 ranks (a loop too) bit
for bit, and a checkpointed run resumed at its step equal to the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness import run_distributed
from references import band_reference, with_self_attention
from tiny_models import TEXT_DIM, build_tiny_wan_folder, build_tiny_wan_transformer
from video_infinity import ClipContext, VideoInfinityPipeline, parallelize
from video_infinity.config import EngineConfig
from video_infinity.context import DenoiseState, FrameLayout
from video_infinity.engine.attention import TemporalAttnProcessor
from video_infinity.frames import clipped_offsets, global_frame_indices

FRAMES = 7  # latent frames of the transformer-level tests: uneven clips on 3 ranks
NO_PHASES = {"local_phase": None, "global_phase": None}


# ---------------------------------------------------------------- pure rules
@pytest.mark.unit
def test_rotating_global_frames_shift_by_the_step_and_visit_every_frame():
    fixed = global_frame_indices(21, 4)
    assert fixed == [2, 7, 13, 18]
    assert global_frame_indices(21, 4, shift=0) == fixed  # "fixed": step 0, as before
    assert global_frame_indices(21, 4, shift=3) == [0, 5, 10, 16]  # (2, 7, 13, 18) + 3 mod 21, ascending
    assert global_frame_indices(21, 4, shift=21) == fixed  # a whole turn
    assert global_frame_indices(21, 4, shift=25) == global_frame_indices(21, 4, shift=4)
    # Over one turn every frame is a global frame exactly top_k times; each step's set stays distinct.
    counts = [0] * 21
    for step in range(21):
        frames = global_frame_indices(21, 4, shift=step)
        assert len(set(frames)) == 4 and frames == sorted(frames)
        for frame in frames:
            counts[frame] += 1
    assert counts == [4] * 21
    assert global_frame_indices(5, 0, shift=3) == [] and global_frame_indices(3, 8, shift=1) == [0, 1, 2]


@pytest.mark.unit
def test_clipped_offsets_keep_the_sign_and_clamp_the_distance():
    assert clipped_offsets(5, range(0, 11), None) == list(range(-5, 6))
    assert clipped_offsets(5, range(0, 11), 2) == [-2, -2, -2, -2, -1, 0, 1, 2, 2, 2, 2]
    assert clipped_offsets(0, [-3, 9], 4) == [-3, 4]  # unwrapped loop positions too
    assert clipped_offsets(3, [3], 1) == [0]


@pytest.mark.unit
def test_a_rotating_call_takes_the_steps_shifted_frames_and_a_fixed_one_ignores_the_step():
    state = DenoiseState(layout=FrameLayout.split(9, 1, 0), timestep=500.0)
    rotating = TemporalAttnProcessor(EngineConfig(attn={"top_k": 3, "global_frames": "rotating"}), ClipContext(), state)
    fixed = TemporalAttnProcessor(EngineConfig(attn={"top_k": 3}), ClipContext(), state)
    assert fixed.temporal_call("cpu").global_frames == rotating.temporal_call("cpu").global_frames == [1, 4, 7]
    state.step = 2
    assert rotating.temporal_call("cpu").global_frames == [0, 3, 6]  # (1, 4, 7) + 2 mod 9
    assert fixed.temporal_call("cpu").global_frames == [1, 4, 7]


@pytest.mark.unit
def test_the_step_is_counted_from_the_calls_until_the_sampling_loop_gives_it():
    # Under another sampling loop (diffusers' own pipeline): a new timestep is a new step; guidance's
    # second call at the same timestep is not. Once the loop gives the step, it is the loop's.
    model = build_tiny_wan_transformer()
    x = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    handle = parallelize(model, {"attn": {"padding": 0, "top_k": 0}})
    steps = []
    with torch.no_grad():
        for t in (999.0, 999.0, 700.0, 700.0, 300.0):
            model(x, torch.tensor([t]), text)
            steps.append(handle.state.step)
        handle.set_step(7)
        model(x, torch.tensor([100.0]), text)
    handle.remove()
    assert steps == [0, 0, 1, 1, 2]
    assert handle.state.step == 7


# ---------------------------------------------------------------- rotary_clip on a tiny Wan transformer
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``WanAttnProcessor`` rotary embedding (absolute angles)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class _ClippedRotaryReference:
    """Dense self-attention of a Wan block on the whole video with diffusers' absolute rotary tables,
    where a query of latent frame q sees each key of latent frame k with the temporal angle of frame
    q + clamp(k - q, -clip, clip) (its spatial angle its own): the local keys within ``padding``
    frames, then the ``global_frames``' keys (seen by every query). No biases."""

    def __init__(self, frames: int, tokens: int, padding: int, clip: int, global_frames: list[int], t_dim: int) -> None:
        self.frames, self.tokens, self.padding, self.clip = frames, tokens, padding, clip
        self.global_frames, self.t_dim = global_frames, t_dim

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert encoder_hidden_states is None and attention_mask is None
        heads, tokens, t_dim = attn.heads, self.tokens, self.t_dim
        q = _rotary(attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1)), *rotary_emb)
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        key_frames = list(range(self.frames)) + self.global_frames
        rows = torch.tensor([f * tokens + j for f in key_frames for j in range(tokens)])
        k, v = k[:, rows], v[:, rows]
        cos, sin = (t[:, rows] for t in rotary_emb)
        outputs = []
        for frame in range(self.frames):
            moved = [frame + d for d in clipped_offsets(frame, key_frames, self.clip)]
            moved_rows = torch.tensor([f * tokens for f in moved for _ in range(tokens)])
            key = _rotary(k, *(torch.cat([t[:, moved_rows, :, :t_dim], c[..., t_dim:]], dim=-1)
                               for t, c in zip(rotary_emb, (cos, sin))))
            seen = torch.tensor([abs(f - frame) <= self.padding for f in range(self.frames)] + [True] * len(self.global_frames))
            query = q[:, frame * tokens : (frame + 1) * tokens]
            outputs.append(F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2),
                attn_mask=seen.repeat_interleave(tokens)[None, :]).transpose(1, 2))
        out = torch.cat(outputs, dim=1).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def _clipped_reference(model, x, t, text, padding: int, clip: int, global_frames: list[int]) -> torch.Tensor:
    tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
    return with_self_attention(model, lambda: _ClippedRotaryReference(x.shape[2], tokens, padding, clip, global_frames,
                                                                      model.rope.t_dim), x, t, text)


def _engine(model, settings: dict, x, t, text, ctx: ClipContext | None = None) -> torch.Tensor:
    handle = parallelize(model, settings, ctx or ClipContext(total_frames=x.shape[2]))
    try:
        with torch.no_grad():
            return model(x, t, text).sample
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def wan():
    g = torch.Generator().manual_seed(4)
    return {"model": build_tiny_wan_transformer(), "x": torch.randn(1, 4, FRAMES, 4, 6, generator=g),
            "text": torch.randn(1, 5, TEXT_DIM, generator=g), "t": torch.tensor([900.0])}


@pytest.mark.unit
@pytest.mark.parametrize("padding,clip,top_k", [(1000, 2, 0), (2, 1, 0), (1, 2, 2), (2, 2, 0)])
def test_rotary_clip_equals_a_dense_reference_with_clamped_key_angles(wan, padding, clip, top_k):
    """The engine (relative angles per query frame) against diffusers' absolute angles with each key
    moved to q + clamp(k - q): a whole window, a band wider than the clip, global frames (at
    rotary distances up to 5 > 2), and a band within the clip (no distance changes: equal to no clip)."""
    model, x, t, text = wan["model"], wan["x"], wan["t"], wan["text"]
    settings = {"attn": {"padding": padding, "top_k": top_k, **NO_PHASES}}
    clipped = _engine(model, {"attn": {**settings["attn"], "rotary_clip": clip}}, x, t, text)
    reference = _clipped_reference(model, x, t, text, padding, clip, global_frame_indices(FRAMES, top_k))
    torch.testing.assert_close(clipped, reference, atol=1e-5, rtol=0)
    plain = _engine(model, settings, x, t, text)
    if padding <= clip and not top_k:
        torch.testing.assert_close(clipped, plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain, band_reference(model, x, t, text, padding), atol=1e-5, rtol=0)
    else:  # not a test that cannot fail: the clip changes distances, and the output
        assert (clipped - plain).abs().max() > 1e-3


@pytest.mark.unit
@pytest.mark.parametrize("loop", [False, True])
def test_rotary_clip_reaching_the_whole_video_equals_no_clip_bit_for_bit(wan, loop):
    model, x, t, text = wan["model"], wan["x"], wan["t"], wan["text"]
    settings = {"loop": loop, "attn": {"padding": 1, "top_k": 2, "token_num_scale": True}, "block_tokens": 12}
    plain = _engine(model, settings, x, t, text)
    for clip in (FRAMES - 1, 100):  # the longest distance (6), and far beyond
        got = _engine(model, {**settings, "attn": {**settings["attn"], "rotary_clip": clip}}, x, t, text)
        assert torch.equal(got, plain), clip
    shorter = _engine(model, {**settings, "attn": {**settings["attn"], "rotary_clip": 3}}, x, t, text)
    assert (shorter - plain).abs().max() > 1e-4  # global frames 1 and 5: distances 4 and 5 move to 3


# ---------------------------------------------------------------- refusals and config keys
@pytest.mark.unit
def test_rotary_clip_is_refused_in_one_line_for_families_without_rotary_positions(tmp_path):
    from video_infinity.errors import ConfigError
    from video_infinity.families.animatediff.family import AnimateDiffFamily
    from video_infinity.run.config import validate_run_config
    from video_infinity.run.preflight import check_video_shape

    line = r"attn\.rotary_clip applies to models with rotary positions \(Wan\); the unet3d family"
    pipe = VideoInfinityPipeline.from_pretrained(device="cpu")  # the embedded demo model: UNet3D
    calls = []
    pipe.family.model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="^" + line):
        pipe("a red circle", num_frames=8, height=32, width=32, num_inference_steps=1,
             engine={"attn": {"rotary_clip": 2}})
    assert not calls
    with pytest.raises(ValueError, match="^" + line):
        parallelize(pipe.family.model, {"attn": {"rotary_clip": 2}})
    assert not AnimateDiffFamily.rotary_positions and pipe.family.rotary_positions is False

    def run(**model: str):
        return validate_run_config({**model, "devices": ["cpu"], "base_path": str(tmp_path),
                                    "plugin_configs": {"attn": {"rotary_clip": 2, "global_frames": "rotating"}},
                                    "pipe_configs": {"prompts": ["a red circle"], "num_frames": 8, "height": 32,
                                                     "width": 32}})

    from video_infinity.demo import default_model_path

    with pytest.raises(ConfigError, match="^plugin_configs." + line):  # before any rank starts
        check_video_shape(run(model=str(default_model_path())), str(default_model_path()), 1)
    adapter = run(base_model=str(tmp_path / "sd15"), motion_adapter=str(tmp_path / "adapter"))
    with pytest.raises(ConfigError, match=r"^plugin_configs\.attn\.rotary_clip applies .* the animatediff family"):
        check_video_shape(adapter, str(tmp_path / "sd15"), 1)


@pytest.mark.unit
def test_the_options_are_engine_knobs_off_by_default_and_checked():
    from video_infinity.errors import ConfigError
    from video_infinity.presets import PRESETS, resolve_engine
    from video_infinity.run.config import validate_run_config

    default = EngineConfig()
    assert default.attn.rotary_clip is None and default.attn.global_frames == "fixed"
    assert all(resolve_engine(name).attn.rotary_clip is None and resolve_engine(name).attn.global_frames == "fixed"
               for name in PRESETS)
    knobs = {"attn": {"rotary_clip": 3, "global_frames": "rotating"}}
    assert EngineConfig.model_validate(knobs).attn.rotary_clip == 3
    config = validate_run_config({"devices": ["cpu"], "plugin_configs": knobs, "pipe_configs": {"prompts": ["a"]}})
    assert config.plugin_configs.attn.global_frames == "rotating"
    for bad, field in (({"rotary_clip": 0}, "rotary_clip"), ({"global_frames": "moving"}, "global_frames")):
        with pytest.raises(ConfigError, match=rf"^plugin_configs\.attn\.{field}: "):
            validate_run_config({"devices": ["cpu"], "plugin_configs": {"attn": bad}, "pipe_configs": {"prompts": ["a"]}})


# ---------------------------------------------------------------- 1 and 3 gloo ranks, both options on
NUM_FRAMES = 25  # 7 latent frames: clips of 3, 2, 2 on 3 ranks
BOTH = {"attn": {"padding": 1, "top_k": 2, "token_num_scale": True, "rotary_clip": 2, "global_frames": "rotating",
                 "local_phase": {"t": 800, "local_biase": 3}, "global_phase": {"t": 800, "global_biase": 3}},
        "block_tokens": 12}
LOOP = {"loop": True, "attn": {"padding": 2, "top_k": 2, "rotary_clip": 1, "global_frames": "rotating"}}
CALL = dict(num_frames=NUM_FRAMES, height=32, width=48, num_inference_steps=3, guidance_scale=5.0, seed=5,
            output_type="latent", progress=False)


def _options_on_ranks(rank: int, world_size: int, folder: Path, checkpoint_dir: Path) -> dict:
    import torch.distributed as dist

    groups = {world: dist.new_group(list(range(world))) for world in (1, world_size)}  # every rank creates each
    both = VideoInfinityPipeline.from_pretrained(folder, engine=BOTH, device="cpu")
    prompt = ["a cat runs on the beach", "a dog jumps in snow"]
    results: dict = {}
    for world in (1, world_size):
        if rank < world:
            ctx = ClipContext(rank=rank, world_size=world, total_frames=7, group=groups[world])
            results[("both", world)] = both(prompt, context=ctx, **CALL).frames
            results[("loop", world)] = both("a red circle", context=ctx, engine=LOOP, **CALL).frames
            if world == 1:  # not tests that cannot fail: each option changes the video
                for name, change in (("fixed", {"global_frames": "fixed"}), ("no_clip", {"rotary_clip": None})):
                    engine = {**BOTH, "attn": {**BOTH["attn"], **change}}
                    results[(name, 1)] = both(prompt, context=ctx, engine=engine, **CALL).frames
        dist.barrier()
    ctx = ClipContext(rank=rank, world_size=world_size, total_frames=7, group=groups[world_size])

    def stop(pipe, step, _t, _kwargs):
        if step == 0:
            pipe._interrupt = True
        return {}

    both(prompt, context=ctx, checkpoint_dir=checkpoint_dir, checkpoint_every=1, callback_on_step_end=stop, **CALL)
    results["resumed"] = both(prompt, context=ctx, checkpoint_dir=checkpoint_dir, resume=True, **CALL).frames
    return results


@pytest.mark.distributed
def test_both_options_give_the_same_video_on_one_and_three_ranks_and_after_a_resume(tmp_path):
    folder = build_tiny_wan_folder(tmp_path / "wan", ffn_dim=36)
    results = run_distributed(_options_on_ranks, 3, folder, tmp_path / "checkpoint", tmp_dir=tmp_path / "runs")[0]
    for name in ("both", "loop"):
        single, three = results[(name, 1)], results[(name, 3)]
        assert single.shape[2] == 7 and single.abs().max() > 0.1
        assert torch.equal(three, single), f"{name}: {(three - single).abs().max():.3g}"
    for name in ("fixed", "no_clip"):
        assert (results[(name, 1)] - results[("both", 1)]).abs().max() > 1e-4, name
    # Saved after step 0 and resumed at step 1: the global frames of steps 1 and 2, as uninterrupted.
    assert torch.equal(results["resumed"], results[("both", 3)])
