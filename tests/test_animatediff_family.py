"""AnimateDiff loading (pipeline folder; SD base + motion adapter), per-frame prompts (FreeNoise's
``{frame: prompt}`` rule), and one rank's sampling loop: 2 gloo ranks give the 1-process video bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from video_infinity import ClipContext
from video_infinity.demo.random_animatediff import build_random_animatediff
from video_infinity.families.animatediff import (
    encode_frame_prompts,
    frame_prompt_plan,
    load_animatediff,
    sample_on_rank,
)

from engine_utils import run_distributed

FRAMES = 21  # past the 16-frame window: several windows, uneven clips on 2 ranks
KEYFRAMES = {0: "a red circle", 7: "a blue square moving left", 15: "a red circle"}
SAMPLING = dict(num_inference_steps=2, guidance_scale=3.0, seed=5, height=32, width=32,
                engine_config={"attn": {"top_k": 4}})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("animatediff")
    build_random_animatediff(root / "pipeline", seed=3, layout="pipeline")
    build_random_animatediff(root / "split", seed=3, layout="base+adapter")
    return {"root": root, "pipeline": root / "pipeline", "base": root / "split" / "base",
            "adapter": root / "split" / "motion_adapter"}


@pytest.mark.unit
def test_both_layouts_load_the_same_motion_unet(folders):
    from diffusers import UNetMotionModel

    whole = load_animatediff(folders["pipeline"])
    combined = load_animatediff(folders["base"], folders["adapter"])
    assert isinstance(whole.unet, UNetMotionModel) and isinstance(combined.unet, UNetMotionModel)
    a, b = whole.unet.state_dict(), combined.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="motion_adapter"):
        load_animatediff(folders["base"])  # an SD folder alone is no AnimateDiff model


@pytest.mark.unit
def test_keyframe_prompts_follow_free_noise(folders):
    pipe = load_animatediff(folders["pipeline"])
    positive, negative = encode_frame_prompts(pipe, KEYFRAMES, FRAMES, range(FRAMES), guidance_scale=2.0)
    pipe.enable_free_noise(16, 4)
    free_noise, _ = pipe._encode_prompt_free_noise(KEYFRAMES, FRAMES, pipe.device, 1, True)
    pipe.disable_free_noise()
    torch.testing.assert_close(positive[0], free_noise[FRAMES:], atol=1e-6, rtol=0)
    torch.testing.assert_close(negative.expand(FRAMES, -1, -1), free_noise[:FRAMES], atol=1e-6, rtol=0)
    # A rank's frames are the matching rows of the whole video's.
    part, _ = encode_frame_prompts(pipe, KEYFRAMES, FRAMES, range(9, 14), guidance_scale=2.0)
    assert torch.equal(part[0], positive[0, 9:14])


@pytest.mark.unit
def test_prompt_plans():
    distinct, mixes = frame_prompt_plan({0: "a", 4: "b"}, 6)
    assert distinct == ["a", "b"]
    assert [(m.first, m.second, m.weight) for m in mixes] == [
        (0, 1, 0.0), (0, 1, 0.25), (0, 1, 0.5), (0, 1, 0.75), (1, 1, 0.0), (1, 1, 0.0)]
    distinct, mixes = frame_prompt_plan(["a", "b", "a"], 6)
    assert distinct == ["a", "b"] and [m.first for m in mixes] == [0, 0, 1, 1, 0, 0]
    for bad, field in (({1: "a"}, "frame 0"), ({0: "a", 6: "b"}, "past"), ([], "non-empty"), ({0: ""}, "non-empty")):
        with pytest.raises(ValueError, match=field):
            frame_prompt_plan(bad, 6)


def _sample(rank: int, world_size: int, folder: Path) -> torch.Tensor:
    pipe = load_animatediff(folder)
    context = ClipContext(rank=rank, world_size=world_size, total_frames=FRAMES)
    return sample_on_rank(pipe, KEYFRAMES, total_frames=FRAMES, context=context, **SAMPLING)


@pytest.mark.distributed
def test_sampling_on_two_ranks_equals_one_process(folders):
    single = _sample(0, 1, folders["pipeline"])
    assert single.shape == (1, 4, FRAMES, 4, 4) and single.abs().max() > 0.1
    parts = run_distributed(_sample, 2, folders["pipeline"], tmp_dir=folders["root"])
    final = torch.cat(parts, dim=2)
    assert torch.equal(final, single), f"max difference {(final - single).abs().max().item():.3g}"
