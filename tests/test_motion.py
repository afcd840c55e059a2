"""AnimateDiff (diffusers UNetMotionModel) on the engine: window rules, the windowed attention against a
literal per-window reference, equality with diffusers at 16 frames whatever the settings, and
EngineConfig.motion, and worlds 1-4 of a UNet of odd widths under every BLAS environment. Worlds 1-4
through the pipeline and parity with AnimateDiffPipeline: test_conformance."""

from __future__ import annotations


import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from video_infinity import ClipContext, EngineConfig, parallelize
from video_infinity.context import DenoiseState
from video_infinity.config import MotionConfig
from video_infinity.families.animatediff.engine import WindowedMotionAttnProcessor
from video_infinity.frames import global_frame_indices, partition_frames
from video_infinity.families.animatediff.windows import MotionWindows

from tiny_models import build_tiny_motion_unet, load_motion_unet

TIMESTEP = 500
LONG_FRAMES = 41  # past the adapter's 32-position table, uneven clips on 2, 3 and 4 ranks
DUAL_SCOPE = {  # at t=500 both phases are active
    "padding": 2,
    "top_k": 5,
    "local_phase": {"t": 600, "local_biase": 1.5, "global_biase": -0.5},
    "global_phase": {"t": 400, "local_biase": -0.3, "global_biase": 2.0},
}
WHOLE_WINDOW = {"attn": {"top_k": 0, "local_phase": None, "global_phase": None}}


# ---------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("total,window,block", [(41, 16, 4), (40, 16, 5), (16, 16, 4), (9, 16, 4), (100, 12, 12), (33, 16, 1)])
def test_windows_hold_their_block_inside_the_video(total, window, block):
    windows = MotionWindows.for_video(total, window, block)
    covered = []
    for index in range(windows.num_blocks):
        frames, win = windows.block(index), windows.window(index)
        assert len(win) == min(window, total) and win.start >= 0 and win.stop <= total
        assert frames.start >= win.start and frames.stop <= win.stop
        covered.extend(frames)
        for frame in range(total):  # every global frame gets a trained position
            assert 0 <= windows.global_position(frame, win) < len(win)
    assert covered == list(range(total))
    if total <= window:  # one window, the whole video: positions are the frame indices
        assert {windows.window(i) for i in range(windows.num_blocks)} == {range(total)}


@pytest.mark.unit
@pytest.mark.parametrize("total,world", [(41, 1), (41, 2), (41, 3), (41, 4), (20, 7), (64, 2)])
def test_halo_reaches_every_window_of_every_clip(total, world):
    windows = MotionWindows.for_video(total, 16, 4)
    left, right = windows.halo(partition_frames(total, world))
    if world == 1:
        assert (left, right) == (0, 0)
    for clip in partition_frames(total, world):
        for index in windows.blocks_overlapping(clip):
            win = windows.window(index)
            assert win.start >= clip.start - left and win.stop <= clip.stop + right


@pytest.mark.unit
def test_motion_config_rejects_a_block_wider_than_the_window():
    with pytest.raises(ValueError, match="query_block_frames"):
        MotionConfig(window_frames=8, query_block_frames=9)


# ---------------------------------------------------------------------------------------------
# One motion attention against a literal reference
# ---------------------------------------------------------------------------------------------


def _reference_windowed_attention(attn: Attention, x: torch.Tensor, pe: torch.Tensor, windows: MotionWindows,
                                  global_frames: list[int], local_bias: float, global_bias: float) -> torch.Tensor:
    """The definition, computed the slow way: every block projects its window with window-relative
    positions added to the states (so each frame is projected once per window holding it), then
    attends it plus the global frames outside the window at their clamped positions."""
    heads = attn.heads
    outputs = []
    for index in range(windows.num_blocks):
        block, win = windows.block(index), windows.window(index)
        states = x[:, win.start : win.stop] + pe[: len(win)]
        outside = [f for f in global_frames if f not in win]
        global_states = torch.stack([x[:, f] + pe[windows.global_position(f, win)] for f in outside], 1) if outside else x[:, :0]
        queries = attn.to_q(states[:, block.start - win.start : block.stop - win.start])
        keys = torch.cat([attn.to_k(states), attn.to_k(global_states)], 1)
        values = torch.cat([attn.to_v(states), attn.to_v(global_states)], 1)
        bias = torch.tensor([local_bias] * len(win) + [global_bias] * len(outside))

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        weights = torch.softmax(split(queries) @ split(keys).transpose(-1, -2) * attn.scale + bias, dim=-1)
        out = (weights @ split(values)).transpose(1, 2).reshape(x.shape[0], len(block), -1)
        outputs.append(attn.to_out[0](out))
    return torch.cat(outputs, dim=1)


@pytest.mark.unit
@pytest.mark.parametrize("split_invariant", [True, False])
def test_windowed_attention_matches_the_per_window_definition(tmp_path, split_invariant):
    unet = load_motion_unet(build_tiny_motion_unet(tmp_path / "unet"))
    block = next(m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)).transformer_blocks[0]
    attn, pe = block.attn1, block.pos_embed.pe[0]
    total = LONG_FRAMES
    config = EngineConfig.model_validate({"attn": DUAL_SCOPE, "split_invariant": split_invariant})
    state = DenoiseState(layout=ClipContext().layout_for(total), timestep=TIMESTEP)
    x = torch.randn(3, total, attn.to_q.in_features, generator=torch.Generator().manual_seed(3))
    windows = MotionWindows.for_video(total, 16, 4)
    expected = _reference_windowed_attention(attn, x, pe, windows, global_frame_indices(total, DUAL_SCOPE["top_k"]),
                                             *config.attn.phase_biases(TIMESTEP))
    attn.set_processor(WindowedMotionAttnProcessor(config, ClipContext(), state, block.pos_embed))
    with torch.no_grad():
        got = attn(x)
    attn.set_processor(AttnProcessor2_0())
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=0)
    # Guards against a test that cannot fail: with every frame at its global position the output differs.
    with torch.no_grad():
        global_positions = attn(x[:, :32] + pe[:32])
    assert (global_positions - got[:, :32]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# The whole UNet
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def motion_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    unet_dir = build_tiny_motion_unet(root / "unet")
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "x16": torch.randn(2, 4, 16, 8, 8, generator=gen),
        "x12": torch.randn(1, 4, 12, 8, 8, generator=gen),
        # one embedding per frame (batch, frames, seq, dim): every frame its own prompt
        "text": torch.randn(2, LONG_FRAMES, 5, 16, generator=gen),
    }
    return {"root": root, "unet_dir": unet_dir, "inputs": inputs}


@pytest.mark.unit
def test_sixteen_frames_equal_diffusers(motion_setup):
    # A video no longer than the trained clip is one window with positions 0..T-1: whatever the
    # global frames and phase biases (every global frame lies in the window), the unmodified model.
    unet = load_motion_unet(motion_setup["unet_dir"])
    inputs = motion_setup["inputs"]
    text16 = inputs["text"][:, :16]
    with torch.no_grad():
        for x, text in ((inputs["x16"], text16), (inputs["x12"], text16[:1, :12])):
            frames = x.shape[2]
            plain = unet(x, TIMESTEP, text.flatten(0, 1)).sample  # diffusers' own layout: (batch*frames, seq, dim)
            for settings in (WHOLE_WINDOW, {}, {"attn": DUAL_SCOPE}, {"split_invariant": False}):
                handle = parallelize(unet, settings, ClipContext(total_frames=frames))
                got = unet(x, TIMESTEP, text).sample
                handle.remove()
                torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
            assert torch.equal(unet(x, TIMESTEP, text.flatten(0, 1)).sample, plain)  # remove() restored it


@pytest.mark.unit
def test_engine_config_motion_reaches_the_motion_attention(motion_setup):
    # EngineConfig.motion is what parallelize uses: a window past the position table is refused,
    # a smaller window changes a 16-frame output, and its validation names the field.
    unet = load_motion_unet(motion_setup["unet_dir"])
    with pytest.raises(ValueError, match="motion.window_frames"):
        parallelize(unet, {"motion": {"window_frames": 40}})
    x, text = motion_setup["inputs"]["x16"], motion_setup["inputs"]["text"][:, :16]
    outputs = {}
    with torch.no_grad():
        for window in (16, 8):
            handle = parallelize(unet, {**WHOLE_WINDOW, "motion": {"window_frames": window, "query_block_frames": 4}})
            outputs[window] = unet(x, TIMESTEP, text).sample
            handle.remove()
    assert (outputs[16] - outputs[8]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="query_block_frames"):
        EngineConfig.model_validate({"motion": {"window_frames": 4, "query_block_frames": 8}})
