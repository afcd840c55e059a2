"""Multi-prompt: segments over the whole video, linear blends at borders, and in-process generation checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.unit
import torch

from video_infinity.run.config import RunConfig
from video_infinity.demo.random_model import build_random_model
from video_infinity.run import launch
from video_infinity.prompts import FrameMix, frame_embeddings, frame_prompt_mix, unique_prompts


def _weights(mixes: list[FrameMix], num_prompts: int) -> np.ndarray:
    table = np.zeros((len(mixes), num_prompts))
    for row, mix in zip(table, mixes):
        row[mix.first] += 1 - mix.weight
        row[mix.second] += mix.weight
    return table


def test_segments_are_consecutive_nearly_equal_and_rank_free():
    mixes = frame_prompt_mix(10, 3, transition_frames=0)
    assert [m.first for m in mixes] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(m.first == m.second and m.weight == 0 for m in mixes)


def test_transition_blends_linearly_across_each_border():
    weights = _weights(frame_prompt_mix(24, 2, transition_frames=4), 2)
    np.testing.assert_allclose(weights.sum(1), 1)
    # border at frame 12: frames 10..13 ramp from prompt 0 to prompt 1, symmetric around the border
    np.testing.assert_allclose(weights[8:16, 1], [0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1])
    assert (weights[:10, 0] == 1).all() and (weights[14:, 1] == 1).all()


def test_transition_never_exceeds_the_shortest_segment():
    weights = _weights(frame_prompt_mix(9, 3, transition_frames=50), 3)
    np.testing.assert_allclose(weights.sum(1), 1)
    assert np.all(np.diff(weights[:, 2]) >= 0)  # later prompts only gain weight


def test_identical_prompts_give_bit_identical_embeddings():
    distinct, index = unique_prompts(["a cat", "a dog", "a cat"])
    assert distinct == ["a cat", "a dog"] and index == [0, 1, 0]
    embeddings = torch.randn(1, 5, 8)
    mixes = [FrameMix(0, 0, w) for w in (0.0, 0.3, 0.5, 0.9)]
    assert torch.equal(frame_embeddings(embeddings, mixes), embeddings.expand(4, 5, 8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_models")
    return {"plain": build_random_model(root / "plain", seed=1), "fps": build_random_model(root / "fps", seed=2, fps_cond=True)}


def _latents(tmp_path, model, name, **pipe) -> np.ndarray:
    config = RunConfig.model_validate({
        "dtype": "float32", "devices": ["cpu"], "seed": 4, "base_path": str(tmp_path), "model": str(model),
        "pipe_configs": {"prompts": ["a red circle moving right"], "steps": 2, "guidance_scale": 3.0, "total_frames": 6,
                         "height": 32, "width": 32, "file_name": name, "save_latents": True, "scheduler": "ddim", **pipe},
        "plugin_configs": {"attn": {"padding": 2, "top_k": 2}},
    })
    import torch as _torch

    threads = _torch.get_num_threads()
    written = launch(config)
    assert set(written) == {"video", "sidecar", "latents"} and written["video"] == tmp_path / f"{name}.mp4"
    assert _torch.get_num_threads() == threads  # launch leaves the caller's thread count alone
    assert json.loads((tmp_path / f"{name}.json").read_text())["world_size"] == 1
    return np.load(tmp_path / f"{name}.latents.npy")


def test_two_identical_prompts_give_the_same_video_as_one(tmp_path, models):
    one = _latents(tmp_path, models["plain"], "one")
    two = _latents(tmp_path, models["plain"], "two", prompts=["a red circle moving right"] * 2, transition_frames=2)
    other = _latents(tmp_path, models["plain"], "other", prompts=["a red circle moving right", "a blue square moving up"],
                     transition_frames=2)
    np.testing.assert_array_equal(two, one)
    assert np.abs(other - one).max() > 1e-3


def test_fps_conditioned_unet_output_depends_on_fps(tmp_path, models):
    at8 = _latents(tmp_path, models["fps"], "fps8", fps=8)
    again = _latents(tmp_path, models["fps"], "fps8_again", fps=8)
    at24 = _latents(tmp_path, models["fps"], "fps24", fps=24)
    np.testing.assert_array_equal(at8, again)
    assert np.abs(at8 - at24).max() > 1e-3


@pytest.mark.parametrize("total,prompts,transition", [(24, 3, 4), (100, 7, 9), (5, 5, 0)])
def test_a_ranks_frames_get_the_same_mix_as_in_the_whole_video(total, prompts, transition):
    whole = frame_prompt_mix(total, prompts, transition)
    for start, stop in [(0, total), (3, min(total, 11)), (total - 2, total)]:
        assert frame_prompt_mix(total, prompts, transition, range(start, stop)) == whole[start:stop]


def test_keyframe_weights_are_freenoise_interpolation():
    from video_infinity.prompts import keyframe_prompt_mix

    mixes = keyframe_prompt_mix([0, 4, 10], 16)
    # FreeNoise: frame f in [k_i, k_i+1] gets alpha = (f - k_i) / (k_i+1 - k_i); the last prompt holds to the end
    expected = [(0, 1, f / 4) for f in range(4)] + [(1, 2, (f - 4) / 6) for f in range(4, 10)] + [(2, 2, 0.0)] * 6
    assert [(m.first, m.second, m.weight) for m in mixes] == expected
    assert keyframe_prompt_mix([0, 4, 10], 16, range(5, 7)) == mixes[5:7]


def test_held_keyframes_cut_and_cross_fade_at_each_start():
    from video_infinity.prompts import prompt_mix

    _, hard = prompt_mix({0: "a", 8: "b"}, 16, range(16), transition_frames=0, keyframe_mode="hold")
    assert [m.first if m.weight == 0 else None for m in hard] == [0] * 8 + [1] * 8  # a cut at frame 8
    _, faded = prompt_mix({0: "a", 8: "b"}, 16, range(16), transition_frames=4, keyframe_mode="hold")
    weights = [(m.first, m.second, m.weight) for m in faded]
    assert weights[:6] == [(0, 0, 0.0)] * 6 and weights[10:] == [(1, 1, 0.0)] * 6
    assert [w for _, _, w in weights[6:10]] == [0.125, 0.375, 0.625, 0.875]  # frames 6-9 fade a -> b
    _, smooth = prompt_mix({0: "a", 8: "b"}, 16, range(16), transition_frames=4)  # interpolate: FreeNoise
    assert smooth[4] == FrameMix(0, 1, 0.5)
    from video_infinity.errors import ConfigError
    from video_infinity.run.config import validate_run_config

    with pytest.raises(ConfigError, match="pipe_configs.keyframe_mode"):
        validate_run_config({"pipe_configs": {"prompts": {"0": "a"}, "keyframe_mode": "cut"}})


@pytest.mark.parametrize("total, prompts, transition", [(10, 3, 2), (16, 2, 4), (7, 7, 1), (23, 4, 9)])
def test_a_list_is_its_segment_starts_held(total, prompts, transition):
    """A list of prompts and the held timeline of its segments' starts give every frame the same mix
    (what the web UI relies on when it loads a list config into its timeline)."""
    from video_infinity.prompts import prompt_mix
    from video_infinity.ui.form import parse_timeline

    texts = [f"prompt {i}" for i in range(prompts)]
    timeline = parse_timeline(json.dumps(texts), total)
    assert prompt_mix(texts, total, range(total), transition) == prompt_mix(
        timeline, total, range(total), transition, keyframe_mode="hold")
