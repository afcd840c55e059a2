"""The generation request: one schema (request.py) for the Python call, the run config (the original's
keys map onto it), the command line's flags, the web form, the sidecar and the checkpoint hash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from video_infinity.cli import main
from video_infinity.config import EngineConfig
from video_infinity.errors import ConfigError
from video_infinity.presets import PRESETS, resolve_engine
from video_infinity.request import GenerationRequest
from video_infinity.checkpoint import differences, fingerprint_hash
from video_infinity.run.checkpoint import config_fingerprint, config_name
from video_infinity.run.config import (
    IMAGE_FIELDS,
    REQUEST_KEYS,
    PipeConfig,
    RunConfig,
    config_data,
    load_run_config,
    run_flags,
    validate_run_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROOT = EXAMPLES.parent
FIELDS = list(GenerationRequest.model_fields)


def _request(**values: Any) -> GenerationRequest:
    return GenerationRequest.checked(**{"prompt": "a red circle", "num_frames": 8, **values})


# --- the schema ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_every_field_has_a_docstring_readable_from_the_schema():
    for name, field in GenerationRequest.model_fields.items():
        assert field.description and len(field.description) > 10, name
    assert "whole video" in GenerationRequest.model_json_schema()["properties"]["num_frames"]["description"]


@pytest.mark.unit
@pytest.mark.parametrize("values, words", [
    ({"num_frames": 0}, "num_frames: Input should be greater than or equal to 1"),
    ({"num_frames": True}, "num_frames: Input should be a valid integer"),
    ({"height": 30}, "height: must be a positive multiple of 8, got 30 (use e.g. 24 or 32)"),
    ({"width": "64"}, "width: Input should be a valid integer"),
    ({"num_inference_steps": 0}, "num_inference_steps:"),
    ({"guidance_scale": float("inf")}, "guidance_scale: Input should be a finite number"),
    ({"prompt": ""}, "prompt: must not be empty"),
    ({"prompt": [""]}, "prompt.0: String should have at least 1 character"),
    ({"prompt": {"4": "late"}}, "prompt: a {\"frame\": \"prompt\"} dict needs a prompt for frame 0"),
    ({"prompt": {0: "a", 8: "b"}}, "prompt: keyframe 8 is past the video's last frame"),
    ({"scheduler": "euler"}, "scheduler: Input should be 'model', 'ddim'"),
    ({"eta": 0.5}, "eta: only used by the 'ddim' scheduler"),
    ({"keyframe_mode": "jump"}, "keyframe_mode: Input should be 'interpolate' or 'hold'"),
    ({"engine": "wan3"}, "engine: unknown preset 'wan3'"),
    ({"engine": {"attn": {"paddin": 2}}}, "engine.attn.paddin: unknown key"),
    ({"loop": True, "engine": {"conv_layer": {"enabled": False}}}, "loop: needs temporal convolution halos"),
    ({"steps": 3}, "steps: unknown key, allowed keys: prompt"),
])
def test_a_refused_request_is_one_line_naming_the_field(values, words):
    with pytest.raises(ValueError) as info:
        _request(**values)
    assert str(info.value).startswith(words) and "\n" not in str(info.value), str(info.value)


@pytest.mark.unit
def test_presets_are_resolved_in_one_place():
    wan = resolve_engine("wan")
    assert wan == EngineConfig.model_validate(PRESETS["wan"])
    assert _request(engine="wan").engine == wan
    run = validate_run_config({"devices": ["cpu"], "pipe_configs": {"prompts": ["a"]}, "plugin_configs": "wan"})
    assert run.plugin_configs == wan and run.request.engine == wan
    assert _request(engine="wan", loop=True).engine_for(EngineConfig()).loop
    assert _request().engine_for(wan) is wan  # no engine in the request: the pipeline's own


# --- the run config: the original's keys map onto the request ----------------------------------------


@pytest.mark.unit
def test_every_request_field_has_its_config_key():
    assert set(REQUEST_KEYS) == set(FIELDS)


@pytest.mark.unit
def test_original_keys_map_onto_the_request():
    original = json.loads((EXAMPLES / "multi_prompts.json").read_text())
    config = validate_run_config(original)
    request = config.request
    pipe = original["pipe_configs"]
    assert request.prompt == pipe["prompts"] and request.num_inference_steps == pipe["steps"]
    assert request.num_frames == pipe["num_frames"] * len(original["devices"])  # the original counts per device
    assert (request.height, request.width, request.fps, request.seed) == (320, 512, 24, 123)
    assert request.guidance_scale == 12.0 and request.engine == EngineConfig.model_validate(original["plugin_configs"])
    demo = load_run_config(EXAMPLES / "cpu_demo.json").request
    assert (demo.num_frames, demo.transition_frames, demo.scheduler, demo.seed) == (128, 8, "dpmsolver++", 0)
    # A request's own check names the file's key.
    bad = {"devices": ["cpu"], "pipe_configs": {"prompts": ["a"], "eta": 0.5}}
    with pytest.raises(ConfigError, match=r"^pipe_configs\.eta: only used by the 'ddim' scheduler"):
        validate_run_config(bad)


@pytest.mark.unit
def test_the_config_files_keys_take_their_definitions_from_the_request():
    for name, path in REQUEST_KEYS.items():
        if not path.startswith("pipe_configs.") or path == "pipe_configs.total_frames":
            continue
        key = PipeConfig.model_fields[path.removeprefix("pipe_configs.")]
        field = GenerationRequest.model_fields[name]
        if name in IMAGE_FIELDS:  # a file names images by path; the request also takes in-memory ones
            assert key.annotation == str | None and "path" in key.description, path
            continue
        assert key.description == field.description and key.metadata == field.metadata, path
    assert PipeConfig.model_fields["fps"].default == 24  # the original's default, where the request says None
    assert RunConfig.model_fields["seed"].description == GenerationRequest.model_fields["seed"].description


@pytest.mark.unit
def test_config_data_is_the_inverse_of_the_run_configs_request():
    request = _request(prompt={0: "a", 4: "b"}, keyframe_mode="hold", transition_frames=2, num_inference_steps=3,
                       guidance_scale=4.0, seed=5, scheduler="ddim", eta=0.3, fps=8, engine="wan", loop=True,
                       negative_prompt="blur")
    config = validate_run_config({**config_data(request), "devices": ["cpu", "cpu"]})
    assert config.request == request


@pytest.mark.unit
def test_the_checkpoint_fingerprint_is_taken_from_the_request():
    config = load_run_config(EXAMPLES / "cpu_demo.json")
    parts = config_fingerprint(config, "none", 2, "float32")
    assert set(FIELDS) - {"loop"} <= set(parts)  # every request field (the loop is in the engine's settings)
    other = load_run_config(EXAMPLES / "cpu_demo.json", ["pipe_configs.steps=21"])
    other_parts = config_fingerprint(other, "none", 2, "float32")
    differ = differences(parts, other_parts)
    assert differ == ["num_inference_steps"] and fingerprint_hash(parts) != fingerprint_hash(other_parts)
    assert [config_name(d) for d in differ] == ["pipe_configs.steps"]  # named as the config file names it


# --- the command line's flags ------------------------------------------------------------------------


@pytest.mark.unit
def test_a_flag_for_every_request_field_and_run_key_with_the_originals_names_as_aliases():
    flags = {flag.name: flag for flag in run_flags()}
    assert set(FIELDS) <= set(flags)
    assert {"model", "devices", "dtype", "base_path", "export_fps", "file_name", "checkpoint_every"} <= set(flags)
    assert flags["num_inference_steps"].aliases == ("--steps",) and flags["prompt"].aliases == ("--prompts",)
    assert flags["num_frames"].path == "pipe_configs.total_frames"


@pytest.mark.unit
def test_help_lists_every_field_with_its_docstring(capsys):
    assert main(["generate", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps the lines, also at hyphens
    for flag in run_flags():
        assert flag.option in text, flag.option
        assert "".join(flag.help.split()) in text, flag.name
    assert "--steps" in text and "--no-loop" in text


@pytest.mark.unit
def test_flags_override_a_config_file_and_set_overrides_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text((EXAMPLES / "single_gpu.json").read_text())  # 24 frames per device
    flags = {"num_frames": "16", "num_inference_steps": "2", "prompt": "a red circle", "devices": "2",
             "engine": "wan", "loop": True, "seed": "9", "model": "my/model"}
    run = load_run_config(config, ["pipe_configs.steps=3"], flags)
    assert (run.pipe_configs.num_frames, run.total_frames, run.request.num_frames) == (None, 16, 16)
    assert run.pipe_configs.steps == 3  # --set comes last
    assert run.pipe_configs.prompts == ["a red circle"] and run.devices == ["cpu", "cpu"] and run.seed == 9
    assert run.plugin_configs.attn.top_k == PRESETS["wan"]["attn"]["top_k"] and run.plugin_configs.loop
    assert run.model == "my/model" and run.base_model == "cerspense/zeroscope_v2_576w"  # the rest: the file's
    keyframes = load_run_config(config, [], {"prompt": '{"0": "a", "8": "b"}', "num_frames": "12", "devices": "1"})
    assert keyframes.request.prompt == {0: "a", 8: "b"}


@pytest.mark.unit
@pytest.mark.parametrize("args, line", [
    (["--height", "30"], "--height: must be a positive multiple of 8, got 30 (use e.g. 24 or 32)"),
    (["--steps", "ten"], "--num-inference-steps: Input should be a valid integer, got 'ten'"),
    (["--devices", "two"], "--devices: cannot read 'two'"),
    (["--engine", "wan3"], "--engine: unknown preset 'wan3'"),
    (["--engine", '{"attn": {"paddin": 1}}'], "--engine: attn.paddin: unknown key"),
    (["--prompt", '{"3": "late"}'], '--prompt: a {"frame": "prompt"} dict needs a prompt for frame 0'),
    (["--num-frames", "1", "--devices", "2"], "--num-frames: the video has 1 frames but there are 2 devices"),
])
def test_a_bad_flag_is_one_line_naming_it_before_anything_starts(args, line, capsys, tmp_path):
    argv = ["generate", "--prompt", "a red circle", "--base-path", str(tmp_path / "out"), *args]
    if "--prompt" in args:
        argv[1:3] = []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"video-infinity: error: {line}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_without_a_config_file_a_prompt_is_needed(capsys):
    assert main(["generate", "--num-frames", "8"]) == 2
    assert capsys.readouterr().err == ("video-infinity: error: --prompt: give a prompt (e.g. --prompt 'a red circle "
                                       "moving right') or a --config file\n")


# --- end to end: a first run with flags only ---------------------------------------------------------


@pytest.mark.e2e
def test_flags_only_run_on_the_embedded_demo_model(tmp_path, offline_env):
    from video_infinity.video_io import read_video

    command = [str(Path(sys.executable).parent / "video-infinity"), "generate", "--prompt", "a red circle moving right",
               "--num-frames", "4", "--devices", "2", "--steps", "2", "--height", "32", "--width", "32",
               "--base-path", str(tmp_path), "--file-name", "first"]
    result = subprocess.run(command, env=offline_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    frames, _ = read_video(tmp_path / "first.mp4")
    assert frames.shape[:3] == (4, 32, 32)
    sidecar = json.loads((tmp_path / "first.json").read_text())
    assert sidecar["world_size"] == 2 and sidecar["config"]["model"] is None  # the embedded demo model
    request = sidecar["request"]
    assert (request["prompt"], request["num_frames"], request["num_inference_steps"]) == (
        ["a red circle moving right"], 4, 2)
    assert GenerationRequest.model_validate_json(json.dumps(request)).num_frames == 4  # the dump reads back
