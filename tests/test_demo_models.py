"""The embedded demo models by name: ``"demo"`` (UNet3D, the default) and ``"demo-wan"`` (Wan),
wherever a model is given (the Python call, a run config and the CLI, the web form), the
precedence of a name over a local folder of that name, and the one-line refusals of an unknown name
and of an embedded model this installation lacks.

Both models' weights are part of the repository: a test that needs them fails without them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from pathlib import Path

import pytest

from cli_utils import CLI, ROOT, ok
from video_infinity.demo import (
    DEMO_RUN,
    EMBEDDED_MODELS,
    WAN_WEIGHTS_DIR,
    WEIGHTS_DIR,
    embedded_run,
    resolve_model,
)
from video_infinity.errors import ModelLoadError

EXAMPLE = ROOT / "examples" / "cpu_demo_wan.json"


def _without_wan_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This installation as if built without ``demo/weights_wan/``."""
    missing = tmp_path / "weights_wan"
    monkeypatch.setitem(EMBEDDED_MODELS, "demo-wan", dataclasses.replace(EMBEDDED_MODELS["demo-wan"], path=missing))
    return missing


@pytest.mark.unit
def test_each_name_resolves_to_its_folder_and_other_models_pass_through():
    assert list(EMBEDDED_MODELS) == ["demo", "demo-wan"]
    assert resolve_model(None) == resolve_model("demo") == str(WEIGHTS_DIR)
    assert resolve_model("demo-wan") == str(WAN_WEIGHTS_DIR)
    assert resolve_model("/some/folder") == "/some/folder"
    assert resolve_model("org/model") == "org/model"
    assert resolve_model(Path("demo-wan")) == "demo-wan"  # a Path is a path, never a name


@pytest.mark.unit
def test_a_name_wins_over_a_local_folder_of_that_name(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-wan").mkdir()
    with caplog.at_level(logging.WARNING, logger="video_infinity.demo"):
        assert resolve_model("demo-wan") == str(WAN_WEIGHTS_DIR)
    assert "give it as ./demo-wan to use it" in caplog.text
    assert resolve_model("./demo-wan") == "./demo-wan"


@pytest.mark.unit
def test_an_unknown_name_and_missing_weights_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError) as unknown:
        resolve_model("demo-wan2")
    assert str(unknown.value) == ("model: unknown embedded model 'demo-wan2'; the embedded models are 'demo', "
                                  "'demo-wan' (or give a model folder or hub id)")
    missing = _without_wan_weights(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError) as lacking:
        resolve_model("demo-wan")
    assert str(lacking.value).startswith(f"model: the embedded model 'demo-wan' is not in this installation "
                                         f"({missing} is missing or incomplete); install")
    assert "\n" not in str(lacking.value)


@pytest.mark.unit
def test_demo_without_its_weights_falls_back_to_the_random_model_with_a_warning(tmp_path, monkeypatch, caplog):
    import video_infinity.demo as demo

    monkeypatch.setitem(EMBEDDED_MODELS, "demo", dataclasses.replace(EMBEDDED_MODELS["demo"], path=tmp_path / "none"))
    monkeypatch.setattr(demo, "_random_model_path", lambda: tmp_path / "random")  # not built here: seconds
    with caplog.at_level(logging.WARNING, logger="video_infinity.demo"):
        assert resolve_model("demo") == resolve_model(None) == str(tmp_path / "random")
    assert "whose videos are noise" in caplog.text


@pytest.mark.unit
def test_the_cli_refuses_missing_weights_in_one_line_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    from video_infinity.cli import main

    _without_wan_weights(monkeypatch, tmp_path)
    code = main(["generate", "--model", "demo-wan", "--prompt", "a red circle moving right",
                 "--base-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"video-infinity: error: model: the embedded model 'demo-wan' is not in this installation "
        f"({tmp_path / 'weights_wan'} is missing or incomplete); install video-infinity from a source checkout that "
        "has its weights (pip install .), or give a model folder or hub id"]
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize("name,family", [("demo", "unet3d"), ("demo-wan", "wan")])
def test_from_pretrained_by_name(name, family):
    from video_infinity import VideoInfinityPipeline

    pipe = VideoInfinityPipeline.from_pretrained(name, device="cpu")
    assert pipe.family.name == family
    assert Path(pipe._model_files[0]) == EMBEDDED_MODELS[name].path


@pytest.mark.unit
def test_the_example_run_config_names_demo_wan_and_passes_the_preflight(tmp_path):
    from video_infinity.config import EngineConfig
    from video_infinity.run.config import load_run_config
    from video_infinity.run.preflight import prepare

    config = load_run_config(EXAMPLE, [f"base_path={tmp_path}"])
    assert config.model == "demo-wan" and config.devices == ["cpu", "cpu"]
    # local attention only: the demo model's training windows (9 latent frames) never held far global frames
    assert config.total_frames == 129
    assert config.plugin_configs == EngineConfig.model_validate({"attn": {"padding": 8, "top_k": 0}})
    assert config.master_port != json.loads((ROOT / "examples" / "cpu_demo.json").read_text())["master_port"]
    paths, model, _ = prepare(config)
    assert model == str(WAN_WEIGHTS_DIR) and paths["video"] == tmp_path / "cpu_demo_wan.mp4"


@pytest.mark.unit
def test_cli_run_defaults_follow_the_named_embedded_model():
    assert embedded_run(None) == embedded_run("demo") == DEMO_RUN
    wan = embedded_run("demo-wan")
    assert wan["pipe_configs"] == {"height": 64, "width": 64, "total_frames": 33, "steps": 20, "guidance_scale": 5.0,
                                   "fps": 8, "scheduler": "model"}
    assert embedded_run("/some/folder") is None
    wan["pipe_configs"]["steps"] = 1  # a copy
    assert embedded_run("demo-wan")["pipe_configs"]["steps"] == 20


@pytest.mark.unit
def test_the_web_form_offers_both_models_and_checks_a_demo_wan_run(tmp_path):
    from video_infinity.ui.form import GenerationForm, embedded_model_settings, model_choices
    from video_infinity.ui.runs import RunRecord
    from video_infinity.ui.studio import Studio, _is_demo

    assert [value for _, value in model_choices()] == ["demo", "demo-wan"]
    settings = embedded_model_settings("demo-wan")
    assert (settings["num_frames"], settings["height"], settings["preset"]) == (17, 64, "wan")
    assert embedded_model_settings("/some/folder") == {}
    form = GenerationForm(prompts={0: "a red circle moving right", 8: "a green circle moving right"}, model="demo-wan",
                          devices="2", **settings)
    config, _ = Studio(tmp_path).check(form)  # the CLI's pre-flight, with the name resolved
    assert config.model == "demo-wan"
    record = RunRecord("x", "done", 0.0, config.model_dump(mode="json"), None, None, None, None, None)
    assert _is_demo(record)  # a demo-wan video gets the probe's report too


@pytest.mark.unit
def test_the_web_ui_model_field_lists_both_names(tmp_path):
    pytest.importorskip("gradio")
    from video_infinity.ui.app import build_app
    from video_infinity.ui.studio import Studio

    app = build_app(Studio(tmp_path))
    field = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "model")
    assert [value for _, value in field.choices] == ["demo", "demo-wan"]
    assert field.allow_custom_value  # a folder or hub id can still be typed in


@pytest.mark.e2e
def test_generate_with_model_demo_wan_uses_its_folder_and_run_defaults(tmp_path, offline_env):
    """17 frames, 2 steps, one process: the name through the CLI, the demo-wan defaults (64x64, CPU,
    the folder's scheduler) and the sidecar's clip facts."""
    done = ok(subprocess.run([*CLI, "--model", "demo-wan", "--prompt", "a red circle moving right", "--num-frames",
                              "17", "--steps", "2", "--base-path", str(tmp_path), "--file-name", "wan"],
                             env=offline_env, cwd=ROOT, capture_output=True, text=True, timeout=120))
    assert "Traceback" not in done.stderr
    sidecar = json.loads((tmp_path / "wan.json").read_text())
    assert sidecar["family"] == "wan" and Path(sidecar["model_path"]) == WAN_WEIGHTS_DIR
    assert sidecar["config"]["model"] == "demo-wan" and sidecar["config"]["devices"] == ["cpu"]
    request = sidecar["request"]
    assert (request["height"], request["width"], request["scheduler"]) == (64, 64, "model")
    assert (sidecar["temporal_compression"], sidecar["clip_borders"]) == (4, [])
