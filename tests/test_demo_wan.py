"""The embedded trained Wan demo model (``demo-wan``): the engine gives the same video on 2 ranks as on 1
with the shipped weights and the ``wan`` preset, and the published evaluation figures are those of the
committed results JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from harness import run_distributed

from video_infinity import VideoInfinityPipeline
from video_infinity.context import ClipContext
from video_infinity.demo import WAN_WEIGHTS_DIR, data

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = ROOT / "benchmarks" / "results" / "demo_wan_eval.json"
FRAMES = 41  # 11 latent frames: clips of 6 and 5, wider than the preset's window with its global frames
CALL = dict(num_frames=FRAMES, height=data.SIZE, width=data.SIZE, num_inference_steps=4, guidance_scale=5.0, seed=3,
            progress=False)


def _on_ranks(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    groups = {world: dist.new_group(list(range(world))) for world in (1, world_size)}
    pipe = VideoInfinityPipeline.from_pretrained("demo-wan", engine="wan", device="cpu")
    results = {}
    for world in (1, world_size):
        if rank < world:
            ctx = ClipContext(rank=rank, world_size=world, total_frames=11, group=groups[world])
            results[world] = pipe(["a red circle moving right", "a blue square moving up"], context=ctx,
                                  output_type="latent", **CALL).frames
        dist.barrier()
    return results


@pytest.mark.distributed
def test_the_trained_model_gives_the_same_video_on_two_ranks_as_on_one(tmp_path):
    results = run_distributed(_on_ranks, 2, tmp_dir=tmp_path)[0]
    single, two = results[1], results[2]
    assert single.shape[2] == 11 and single.abs().max() > 0.1
    assert torch.equal(two, single), f"{(two - single).abs().max():.3g}"


def test_the_published_evaluation_is_the_committed_json():
    """The weights' README quotes the 48-prompt evaluation; its figures are the JSON's."""
    result = json.loads(EVALUATION.read_text())["results"][0]
    assert result["samples"] == len(data.all_classes()) and result["frames"] == 17
    colour, direction = result["colour_accuracy"], result["direction_accuracy"]
    assert sum(r["colour_ok"] for r in result["rows"]) == round(colour * result["samples"])
    assert sum(r["direction_ok"] for r in result["rows"]) == round(direction * result["samples"])
    readme = (WAN_WEIGHTS_DIR / "README.md").read_text()
    quoted = re.search(r"colour (\d+(?:\.\d)?)%, direction (\d+(?:\.\d)?)%", readme)
    assert quoted is not None, "the weights' README quotes no evaluation"
    assert (float(quoted[1]), float(quoted[2])) == (round(100 * colour, 1), round(100 * direction, 1))
