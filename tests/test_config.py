"""Run configuration: the original example configs, validation messages, overrides, the CLI's error path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from video_infinity import EngineConfig
from video_infinity.run.config import (
    ConfigError,
    PipeConfig,
    RunConfig,
    apply_overrides,
    check_devices_available,
    load_run_config,
    validate_run_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ORIGINAL_SHAPES = ["config.json", "multi_prompts.json", "single_gpu.json"]


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())


def minimal(**pipe: Any) -> dict[str, Any]:
    return {"devices": ["cpu"], "pipe_configs": {"prompts": ["a cat"], **pipe}}


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        validate_run_config(data)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the shipped examples -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORIGINAL_SHAPES)
@pytest.mark.parametrize("strip_new_keys", [False, True])
def test_original_examples_validate(name: str, strip_new_keys: bool) -> None:
    data = example(name)
    if strip_new_keys:  # the original files have neither key
        data.pop("model"), data.pop("base_model")
    config = validate_run_config(data)
    assert config.dtype == "float16"
    assert config.seed == 123 and config.master_port == 29516 and config.base_path == "./exp"
    assert config.pipe_configs.num_frames == 24 and config.pipe_configs.total_frames is None
    assert config.total_frames == 24 * config.world_size
    assert config.pipe_configs.scheduler is None  # the family's default (sde-dpmsolver++ for UNet3D models)
    assert config.plugin_configs == EngineConfig.model_validate(data["plugin_configs"])
    assert config.model == (None if strip_new_keys else "adamdad/videocrafterv2_diffusers")


def test_example_shapes() -> None:
    assert validate_run_config(example("config.json")).devices == [0, 1, 2, 3]
    multi = validate_run_config(example("multi_prompts.json"))
    assert multi.world_size == 8 and len(multi.pipe_configs.prompts) == 8
    assert multi.plugin_configs.attn.local_phase.t == 850  # type: ignore[union-attr]
    assert validate_run_config(example("single_gpu.json")).devices == [0]


def test_cpu_demo_example() -> None:
    config = load_run_config(EXAMPLES / "cpu_demo.json")
    assert config.uses_cpu and config.world_size == 2 and config.model is None
    assert config.dtype == "float32" and config.total_frames == 128
    assert config.pipe_configs.resolved_file_name() == "cpu_demo"
    assert config.pipe_configs.scheduler == "dpmsolver++" and config.pipe_configs.transition_frames == 8
    check_devices_available(config)  # cpu entries need no GPU


@pytest.mark.parametrize(
    "alias, expected",
    [("torch.float16", "float16"), ("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"),
     ("torch.bfloat16", "bfloat16"), ("float", "float32"), ("fp32", "float32"), ("torch.float32", "float32")],
)
def test_dtype_aliases(alias: str, expected: str) -> None:
    config = validate_run_config({**minimal(), "dtype": alias})
    assert config.dtype == expected
    assert str(config.torch_dtype) == f"torch.{expected}"


def test_frame_counts_and_file_names() -> None:
    pipe = PipeConfig(prompts=["A Beagle, swimming!"], total_frames=10)
    assert pipe.total_frames_for(4) == 10
    pipe.check_world_size(10)
    with pytest.raises(ConfigError, match="pipe_configs.total_frames"):
        pipe.check_world_size(11)
    assert PipeConfig(prompts=["x"]).total_frames_for(3) == 72  # default: 24 per device
    assert PipeConfig(prompts=["x"], num_frames=5).total_frames_for(2) == 10
    assert pipe.resolved_file_name().startswith("a_beagle_swimming_")
    assert PipeConfig(prompts=["x"], file_name="out.mp4").resolved_file_name() == "out"


# --- invalid configs: one line naming the field ------------------------------------------------------


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(base if base is not None else example("single_gpu.json"))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


@pytest.mark.parametrize(
    "data, field, hint",
    [
        (_with("resolution", 1), "resolution: unknown key", "allowed keys: dtype"),
        (_with("pipe_configs.stepz", 1), "pipe_configs.stepz: unknown key", "did you mean 'steps'"),
        (_with("plugin_configs.attn.paddin", 1), "plugin_configs.attn.paddin: unknown key", "padding"),
        (_with("pipe_configs.steps", "30"), "pipe_configs.steps", "integer"),
        (_with("seed", 1.5), "seed", "integer"),
        (_with("pipe_configs.height", 100), "pipe_configs.height", "multiple of 8, got 100 (use e.g. 96 or 104)"),
        (_with("pipe_configs.width", 0), "pipe_configs.width", "multiple of 8"),
        (_with("plugin_configs.attn.padding", -1), "plugin_configs.attn.padding", "greater than or equal to 0"),
        (_with("pipe_configs.prompts", []), "pipe_configs.prompts", "at least 1"),
        (_with("pipe_configs.prompts", [""]), "pipe_configs.prompts.0", "at least 1 character"),
        (_with("devices", [0, 1, 0]), "devices", "GPU 0 is listed twice"),
        (_with("devices", [0, "cpu"]), "devices", "all GPU ids"),
        (_with("devices", []), "devices", "non-empty"),
        (_with("devices", [-1]), "devices", ">= 0"),
        (_with("pipe_configs.total_frames", 48), "pipe_configs.total_frames", "not both"),
        (_with("pipe_configs.file_name", "../x"), "pipe_configs.file_name", "plain file name"),
        (_with("pipe_configs.file_name", "/abs"), "pipe_configs.file_name", "plain file name"),
        (_with("pipe_configs.file_name", "a/b"), "pipe_configs.file_name", "plain file name"),
        (_with("pipe_configs.file_name", "a\\b"), "pipe_configs.file_name", "plain file name"),
        (_with("pipe_configs.file_name", "C:x"), "pipe_configs.file_name", "plain file name"),
        (_with("pipe_configs.scheduler", "euler"), "pipe_configs.scheduler", "'ddim'"),
        (_with("pipe_configs.eta", 0.5), "pipe_configs.eta", "ddim"),
        (_with("pipe_configs.guidance_scale", float("nan")), "pipe_configs.guidance_scale", "finite"),
        (_with("dtype", "int8"), "dtype", "float16"),
        (_with("master_port", 70000), "master_port", "65535"),
        (_with("pipe_configs.num_frames", None, minimal(total_frames=1) | {"devices": ["cpu"] * 2}),
         "pipe_configs.total_frames", "one frame per device"),
        ({"devices": [0]}, "pipe_configs: required key is missing", ""),
        ([1, 2], "config: the top level must be a JSON object", ""),
    ],
)
def test_invalid_config_names_the_field(data: Any, field: str, hint: str) -> None:
    message = config_error(data)
    assert message.startswith(field), message
    assert hint in message, message


def test_gpu_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    config = validate_run_config(example("config.json"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r'^devices: GPU 0 does not exist \(this machine has no GPU; use "cpu"'):
        check_devices_available(config)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^devices: GPU 1 does not exist \(this machine has 1 GPU: ids 0\.\.0\)$"):
        check_devices_available(config)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_devices_available(config)


# --- files and --set overrides -------------------------------------------------------------------


def write(tmp_path: Path, data: Any, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, example("single_gpu.json"))
    config = load_run_config(
        path,
        ["pipe_configs.steps=10", "pipe_configs.file_name=my video", "plugin_configs.attn.padding=4",
         'pipe_configs.prompts=["x", "y"]', "devices=[\"cpu\", \"cpu\"]", "model=null", "pipe_configs.eta=0"],
    )
    assert config.pipe_configs.steps == 10
    assert config.pipe_configs.file_name == "my video"  # not JSON: kept as a string
    assert config.plugin_configs.attn.padding == 4
    assert config.pipe_configs.prompts == ["x", "y"] and config.uses_cpu and config.model is None
    assert load_run_config(path, ["plugin_configs.conv_layer.enabled=false"]).plugin_configs.conv_layer.enabled is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("pipe_configs.prompts.x=1", "--set pipe_configs.prompts.x: pipe_configs.prompts is a list"),
        ("seed.x=1", "--set seed.x: seed is a int"),
        ("no_equals_sign", "--set 'no_equals_sign': expected key.path=value"),
        ("a..b=1", "--set 'a..b=1': expected key.path=value"),
        ("pipe_configs.steps=ten", "pipe_configs.steps: Input should be a valid integer, got 'ten'"),
        ("pipe_configs.height=12", "pipe_configs.height: must be a positive multiple of 8"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(write(tmp_path, example("single_gpu.json")), [override])
    assert str(info.value).startswith(message), info.value


def test_overrides_do_not_mutate_input() -> None:
    data = example("single_gpu.json")
    apply_overrides(data, ["pipe_configs.steps=1"])
    assert data["pipe_configs"]["steps"] == 30


@pytest.mark.parametrize(
    "text, message",
    [
        ('{\n  "seed": 1,\n  "devices": [0,]\n}', "invalid JSON at line 3, column 17"),
        ('{"seed": 1, "seed": 2}', "invalid JSON: duplicate key 'seed'"),
        ("[1]", "the top level must be a JSON object, got list"),
        ("", "invalid JSON at line 1, column 1"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}"), info.value


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_run_config(tmp_path)  # a directory
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_run_config(tmp_path / "bin.json")


# --- the CLI's error path: exit 2, one line, fast, nothing written --------------------------------------


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["pipe_configs"].update(height=100), "pipe_configs.height"),
        (lambda d: d["plugin_configs"]["attn"].update(padding=-1), "plugin_configs.attn.padding"),
        (lambda d: d.update(devices=[3]), "devices"),  # no GPU 3 here (nor on a 1-GPU machine)
        (lambda d: d.update(colour="red"), "colour"),
    ],
)
def test_cli_invalid_config_exits_2(tmp_path: Path, mutate: Any, field: str) -> None:
    data = example("single_gpu.json")
    data["base_path"] = str(tmp_path / "out")
    mutate(data)
    config = write(tmp_path, data)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "video_infinity.cli", "generate", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"video-infinity: error: {field}"), result.stderr
    assert result.stdout == ""
    # Refused before any model loads or rank starts: seconds (the devices check imports torch to
    # count GPUs), not the minute a model load and rank start take; generous for a loaded machine.
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no output folder, no file


def test_cli_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from video_infinity.cli import main

    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["generate"]) == 2  # --config missing: argparse usage error
    capsys.readouterr()
    assert main(["generate", "--config", str(tmp_path / "nope.json"), "--set", "seed=1"]) == 2
    assert capsys.readouterr().err == f"video-infinity: error: {tmp_path / 'nope.json'}: config file not found\n"


# --- fuzz: every input ends in a RunConfig or a one-line ConfigError ------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=16,
)
KNOWN_KEYS = st.sampled_from(
    ["dtype", "devices", "pipe_configs", "plugin_configs", "prompts", "height", "num_frames", "total_frames",
     "file_name", "attn", "padding", "local_phase", "t", "scheduler", "eta", "norm_scope", "conv_layer"]
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _assert_validates_or_config_error(data: Any) -> None:
    try:
        config = validate_run_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert isinstance(config, RunConfig)
        assert config.total_frames >= config.world_size


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(json_values | st.dictionaries(KNOWN_KEYS | st.text(max_size=6), json_values, max_size=6))
def test_fuzz_random_structures(data: Any) -> None:
    _assert_validates_or_config_error(data)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_configs(draw: st.DataObject) -> None:
    data = example(draw.draw(st.sampled_from([*ORIGINAL_SHAPES, "cpu_demo.json"])))
    for _ in range(draw.draw(st.integers(1, 3))):
        path = draw.draw(st.sampled_from(_paths(data)))
        if not path:
            continue
        *parents, last = path
        node = data
        for part in parents:
            node = node[part]
        action = draw.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del node[last]
        elif action == "add" and isinstance(node, dict):
            node[draw.draw(KNOWN_KEYS | st.text(max_size=6))] = draw.draw(json_values)
        else:
            node[last] = draw.draw(json_values | st.integers(-10, 2000) | KNOWN_KEYS)
    _assert_validates_or_config_error(data)


@FUZZ
@given(st.lists(st.text(max_size=30) | st.builds("{}={}".format, KNOWN_KEYS, st.text(max_size=8)), max_size=3))
def test_fuzz_overrides(overrides: list[str]) -> None:
    try:
        data = apply_overrides(example("cpu_demo.json"), overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    _assert_validates_or_config_error(data)


@pytest.mark.parametrize(
    "prompts,world,field,hint",
    [
        ({"4": "a"}, 1, "pipe_configs.prompts", "frame 0"),
        ({"0": "a", "x": "b"}, 1, "pipe_configs.prompts", "frame numbers"),
        ({"0": "a", "5": ""}, 1, "pipe_configs.prompts", "frame 5"),
        ({"0": "a", "10": "b"}, 1, "pipe_configs.prompts", "keyframe 10 is past"),
        ({"0": "a", "12": "b"}, 2, "pipe_configs.prompts", "keyframe 12 is past"),
        ({}, 1, "pipe_configs.prompts", "dict is empty"),
    ],
)
def test_keyframe_prompts_are_checked_against_the_video(prompts: dict, world: int, field: str, hint: str) -> None:
    data = {"devices": ["cpu"] * world, "pipe_configs": {"prompts": prompts, "total_frames": 10 if world == 1 else 12}}
    message = config_error(data)
    assert message.startswith(field) and hint in message, message


def test_keyframe_prompts_take_json_string_keys() -> None:
    config = validate_run_config({"devices": ["cpu"], "pipe_configs": {"prompts": {"8": "b", "0": "a"}, "total_frames": 9}})
    assert config.pipe_configs.prompts == {0: "a", 8: "b"} and config.pipe_configs.first_prompt == "a"


def test_motion_adapter_needs_one_stable_diffusion_base() -> None:
    base = {"devices": ["cpu"], "pipe_configs": {"prompts": ["a"]}, "motion_adapter": "adapter"}
    assert config_error(base).startswith("motion_adapter: also set base_model")
    assert config_error({**base, "model": "a", "base_model": "b"}).startswith("motion_adapter: give its")
    assert validate_run_config({**base, "base_model": "sd"}).motion_adapter == "adapter"
