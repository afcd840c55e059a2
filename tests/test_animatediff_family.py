"""AnimateDiff through the pipeline: loading (pipeline folder; SD base + motion adapter; from_pipe),
per-frame prompts (FreeNoise's ``{frame: prompt}`` rule), and the CLI on 2 CPU ranks. Parity with
AnimateDiffPipeline and worlds 1-4: test_conformance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from video_infinity import ClipContext, VideoInfinityPipeline
from video_infinity.demo.random_animatediff import build_random_animatediff
from video_infinity.families.animatediff.family import AnimateDiffFamily
from video_infinity.families.animatediff.family import load_animatediff


ROOT = Path(__file__).resolve().parents[1]
KEYFRAMES = {0: "a red circle", 7: "a blue square moving left", 15: "a red circle"}
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("animatediff")
    build_random_animatediff(root / "pipeline", seed=3, layout="pipeline")
    build_random_animatediff(root / "split", seed=3, layout="base+adapter")
    return {"root": root, "pipeline": root / "pipeline", "base": root / "split" / "base",
            "adapter": root / "split" / "motion_adapter"}


@pytest.mark.unit
def test_every_way_of_loading_gives_the_same_motion_unet(folders):
    from diffusers import UNetMotionModel

    ways = {
        "pipeline folder": VideoInfinityPipeline.from_pretrained(folders["pipeline"], device="cpu"),
        "base + motion_adapter": VideoInfinityPipeline.from_pretrained(base_model=folders["base"],
                                                                       motion_adapter=folders["adapter"], device="cpu"),
        "adapter as model": VideoInfinityPipeline.from_pretrained(folders["adapter"], base_model=folders["base"], device="cpu"),
        "from_pipe": VideoInfinityPipeline.from_pipe(load_animatediff(folders["pipeline"])),
    }
    reference = ways["pipeline folder"].family.model.state_dict()
    for name, pipe in ways.items():
        assert isinstance(pipe.family, AnimateDiffFamily) and isinstance(pipe.family.model, UNetMotionModel), name
        state = pipe.family.model.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), name
    with pytest.raises(ValueError, match="motion_adapter"):
        load_animatediff(folders["base"])  # an SD folder alone is no AnimateDiff model
    with pytest.raises(ValueError, match="base_model"):
        VideoInfinityPipeline.from_pretrained(folders["adapter"], device="cpu")  # an adapter needs its base
    with pytest.raises(ValueError, match="motion_adapter"):
        VideoInfinityPipeline.from_pretrained(motion_adapter=folders["adapter"], device="cpu")


@pytest.mark.unit
def test_keyframe_prompts_follow_free_noise(folders):
    diffusers_pipe = load_animatediff(folders["pipeline"])
    pipe = VideoInfinityPipeline.from_pipe(diffusers_pipe)
    frames = 21
    request = pipe.check_inputs(KEYFRAMES, num_frames=frames, num_inference_steps=1, guidance_scale=2.0, **SIZE)
    cond = pipe.conditioning(request, ClipContext(total_frames=frames))
    diffusers_pipe.enable_free_noise(16, 4)
    free_noise, _ = diffusers_pipe._encode_prompt_free_noise(KEYFRAMES, frames, diffusers_pipe.device, 1, True)
    diffusers_pipe.disable_free_noise()
    assert cond.prompt_embeds.shape[:2] == (1, frames)  # one embedding per frame
    torch.testing.assert_close(cond.prompt_embeds[0], free_noise[frames:], atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.negative_embeds.expand(frames, -1, -1), free_noise[:frames], atol=1e-6, rtol=0)
    # A rank's frames are the matching rows of the whole video's.
    part = pipe.conditioning(request, ClipContext(rank=1, world_size=2, total_frames=frames))
    assert torch.equal(part.prompt_embeds[0], cond.prompt_embeds[0, 11:])


@pytest.mark.e2e
def test_cli_on_two_cpu_ranks_writes_the_video(folders, offline_env):
    from video_infinity.video_io import read_video

    frames = 18
    config = {
        "dtype": "float32", "devices": ["cpu", "cpu"], "seed": 2, "base_path": str(folders["root"] / "out"),
        "base_model": str(folders["base"]), "motion_adapter": str(folders["adapter"]),
        "pipe_configs": {"prompts": {"0": "a red circle", "9": "a blue square moving left"}, "steps": 2,
                         "guidance_scale": 3.0, "total_frames": frames, "file_name": "animatediff", "export_fps": 8,
                         "scheduler": "ddim", **SIZE},
        "plugin_configs": {"attn": {"top_k": 2}, "motion": {"window_frames": 8, "query_block_frames": 2}},
    }
    path = folders["root"] / "cli.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "video_infinity.cli", "generate", "--config", str(path)], env=offline_env,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    video, fps = read_video(folders["root"] / "out" / "animatediff.mp4")
    assert video.shape == (frames, 32, 32, 3) and fps == 8 and video.std() > 1
    sidecar = json.loads((folders["root"] / "out" / "animatediff.json").read_text())
    assert sidecar["world_size"] == 2 and sidecar["total_frames"] == frames and sidecar["family"] == "animatediff"


@pytest.mark.unit
def test_preflight_refuses_a_folder_that_is_no_motion_adapter(folders):
    from video_infinity.errors import ConfigError
    from video_infinity.run.preflight import check_motion_adapter_folder

    check_motion_adapter_folder(str(folders["adapter"]))
    with pytest.raises(ConfigError, match="^motion_adapter: .* is incomplete"):
        check_motion_adapter_folder(str(folders["base"]))
    with pytest.raises(ConfigError, match="^motion_adapter: .* does not exist"):
        check_motion_adapter_folder(str(folders["root"] / "missing"))


@pytest.mark.unit
def test_a_loop_is_refused_in_one_line_before_any_model_call(folders):
    # Motion windows do not wrap around the video: a loop would silently not be one.
    pipe = VideoInfinityPipeline.from_pretrained(folders["pipeline"], device="cpu")
    calls = []
    pipe.family.model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"^loop: the animatediff family does not make loops"):
        pipe("a red circle", num_frames=8, height=32, width=32, num_inference_steps=1, loop=True)
    assert not calls


@pytest.mark.unit
def test_preflight_refuses_a_loop_for_animatediff_from_config_files(folders, tmp_path):
    from video_infinity.errors import ConfigError
    from video_infinity.run.config import validate_run_config
    from video_infinity.run.preflight import check_video_shape

    def config(**model: str):
        return validate_run_config({**model, "devices": ["cpu"], "base_path": str(tmp_path), "plugin_configs": {"loop": True},
                                    "pipe_configs": {"prompts": ["a red circle"], "num_frames": 8, "height": 32, "width": 32}})

    for run in (config(model=str(folders["pipeline"])),
                config(base_model=str(folders["base"]), motion_adapter=str(folders["adapter"]))):
        model = str(run.model or run.base_model)
        with pytest.raises(ConfigError, match=r"^plugin_configs.loop: the animatediff family does not make loops"):
            check_video_shape(run, model, 1)
