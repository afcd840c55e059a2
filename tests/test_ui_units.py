"""The web UI's parts that need no server: the form as a run config (the CLI's validation, the
server's ceilings, each message tied to its field), past runs under base_path, the ranks' progress
files, and the serve command's refusals."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from video_infinity.cli import main
from video_infinity.run.config import validate_run_config
from video_infinity.run.progress import ProgressReporter, read_progress
from video_infinity.ui import exposure_warning
from video_infinity.ui.form import (
    FormError,
    GenerationForm,
    Limits,
    form_from_config,
    form_from_values,
    parse_devices,
    parse_timeline,
    run_config,
    timeline_from_rows,
)
from video_infinity.ui.runs import find_run, list_runs
from video_infinity.ui.studio import Studio

LIMITS = Limits(max_frames=64, max_side=128, max_steps=50, max_cpu_processes=4)
FORM = GenerationForm(prompts={0: "a red circle moving right", 8: "a blue square moving up"}, num_frames=16,
                      height=64, width=64, steps=2, devices="2", seed=7)


def _config(form: GenerationForm = FORM, tmp: Path = Path("/tmp/never-written")):
    return run_config(form, base_path=str(tmp), file_name="clip", limits=LIMITS)


def test_form_becomes_the_cli_config():
    config = _config(GenerationForm(**{**FORM.__dict__, "negative_prompt": " blur ", "scheduler": "ddim",
                                       "padding": 4, "top_k": 2, "phase_t": 500, "phase_bias": 3, "loop": True}))
    pipe = config.pipe_configs
    assert pipe.prompts == {0: "a red circle moving right", 8: "a blue square moving up"}
    assert (config.total_frames, pipe.height, pipe.width, pipe.steps, config.seed) == (16, 64, 64, 2, 7)
    assert config.devices == ["cpu", "cpu"] and pipe.file_name == "clip" and pipe.negative_prompt == "blur"
    attn = config.plugin_configs.attn
    assert (attn.padding, attn.top_k, attn.local_phase.t, attn.local_phase.local_bias, attn.global_phase.global_bias) == (
        4, 2, 500, 3, 3)
    assert config.plugin_configs.loop and pipe.scheduler == "ddim"
    # What it writes is a config the command line reads back unchanged.
    assert validate_run_config(json.loads(json.dumps(config.model_dump(mode="json")))) == config


def test_phase_bias_zero_turns_the_phases_off_and_the_engine_json_replaces_the_preset():
    off = _config(GenerationForm(**{**FORM.__dict__, "phase_bias": 0}))
    assert off.plugin_configs.attn.local_phase is None and off.plugin_configs.attn.global_phase is None
    wan = _config(GenerationForm(**{**FORM.__dict__, "preset": "wan"}))
    assert (wan.plugin_configs.attn.padding, wan.plugin_configs.attn.top_k) == (8, 4)
    custom = _config(GenerationForm(**{**FORM.__dict__, "preset": "wan", "engine_json": '{"attn": {"top_k": 3}}'}))
    assert custom.plugin_configs.attn.top_k == 3 and custom.plugin_configs.attn.padding == 8  # the default's padding


@pytest.mark.parametrize("changes, field, words", [
    ({"height": 65}, "height", "pipe_configs.height: must be a positive multiple of 8"),
    ({"num_frames": 65}, "num_frames", "at most 64 frames on this server"),
    ({"width": 136}, "width", "at most 128 pixels"),
    ({"steps": 51}, "steps", "at most 50 steps"),
    ({"devices": "9"}, "devices", "at most 4 CPU processes"),
    ({"devices": "two"}, "devices", "devices: cannot read 'two'"),
    ({"devices": "gpu:a"}, "devices", "GPU ids must be numbers"),
    ({"prompts": {3: "late start"}}, "prompts", "needs a prompt for frame 0"),
    ({"prompts": {0: "a", 40: "b"}}, "prompts", "keyframe 40 is past the video's last frame"),
    ({"num_frames": 1}, "num_frames", "the video has 1 frames but there are 2 devices"),
    ({"scheduler": "euler"}, "scheduler", "unknown 'euler'"),
    ({"padding": -1}, "padding", "plugin_configs.attn.padding"),
    ({"preset": "fast"}, "preset", "unknown engine preset 'fast'"),
    ({"engine_json": "{not json"}, "engine_json", "invalid JSON"),
    ({"engine_json": '{"attn": {"paddin": 2}}'}, "engine_json", "did you mean 'padding'"),
])
def test_each_refusal_names_its_form_field_with_the_cli_message(changes, field, words):
    with pytest.raises(FormError) as info:
        _config(GenerationForm(**{**FORM.__dict__, **changes}))
    assert info.value.field == field, str(info.value)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_timelines_from_rows_and_json():
    assert timeline_from_rows([(0, " a "), (8.0, "b"), (None, ""), (3, "  ")]) == {0: "a", 8: "b"}
    assert parse_timeline('{"0": "a", "8": "b"}', 16) == {0: "a", 8: "b"}
    assert parse_timeline("just one prompt", 16) == {0: "just one prompt"}
    assert parse_timeline('["a", "b", "c"]', 12) == {0: "a", 4: "b", 8: "c"}
    for bad, words in [("{\"0\": ", "invalid JSON"), ('{"x": "a"}', "start frames must be numbers"),
                       ('{"0": ""}', "must be non-empty"), ("", "no prompt given"), ("[]", "non-empty texts")]:
        with pytest.raises(FormError, match=words) as info:
            parse_timeline(bad, 16)
        assert info.value.field == "prompts"
    with pytest.raises(FormError, match="has no start frame"):
        timeline_from_rows([(None, "orphan")])
    with pytest.raises(FormError, match="given twice"):
        timeline_from_rows([(0, "a"), (0.0, "b")])


def test_devices_text():
    assert parse_devices("3", LIMITS) == ["cpu"] * 3
    assert parse_devices(2, LIMITS) == ["cpu"] * 2
    assert parse_devices("gpu:0, 2", LIMITS) == [0, 2] and parse_devices("cuda:1", LIMITS) == [1]
    assert parse_devices('["cpu", "cpu"]', LIMITS) == ["cpu", "cpu"]
    with pytest.raises(FormError, match="at least 1"):
        parse_devices("0", LIMITS)


def test_use_these_settings_gives_the_same_run_back(tmp_path):
    original = _config(GenerationForm(**{**FORM.__dict__, "preset": "wan", "phase_bias": 0, "transition_frames": 3}))
    again = run_config(form_from_config(original.model_dump(mode="json")), base_path=str(tmp_path / "x"),
                       file_name="clip", limits=LIMITS)
    ignore = {"base_path"}
    assert {k: v for k, v in again.model_dump().items() if k not in ignore} == {
        k: v for k, v in original.model_dump().items() if k not in ignore}
    # A list of prompts comes back as the timeline the engine spreads it over.
    listed = validate_run_config({"devices": ["cpu"] * 2, "pipe_configs": {"prompts": ["a", "b", "c"], "total_frames": 12}})
    assert form_from_config(listed).prompts == {0: "a", 4: "b", 8: "c"}


def _sidecar(base: Path, name: str, config: dict, age: float) -> None:
    (base / f"{name}.mp4").write_bytes(b"not decoded here")
    (base / f"{name}.json").write_text(json.dumps({"video": f"{name}.mp4", "config": config, "world_size": 2, "seed": 7,
                                                    "total_frames": 16, "seconds": {"total": 3.5, "load": 0.5},
                                                    "peak_memory_bytes": [2**20, 2**21], "devices": ["cpu", "cpu"]}))
    stamp = time.time() - age
    os.utime(base / f"{name}.json", (stamp, stamp))


def test_past_runs_newest_first_from_sidecars_and_saved_configs_only_under_base(tmp_path):
    base = tmp_path / "runs"
    base.mkdir()
    config = _config(tmp=base).model_dump(mode="json")
    _sidecar(base, "older", config, age=100)
    _sidecar(base, "newer", config, age=10)
    (base / "stopped.config.json").write_text(json.dumps(config))
    (base / "paused.config.json").write_text(json.dumps(config))
    (base / "paused.ckpt").write_bytes(b"checkpoint")
    for path, age in (("stopped.config.json", 50), ("paused.config.json", 30), ("paused.ckpt", 30)):
        os.utime(base / path, (time.time() - age, time.time() - age))
    (base / "settings.json").write_text(json.dumps({"devices": ["cpu"]}))  # a user's config: not a run
    outside = tmp_path / "secret"
    outside.mkdir()
    _sidecar(outside, "secret", config, age=0)
    (base / "leak.json").symlink_to(outside / "secret.json")  # a link out of base_path is not followed

    runs = list_runs(base)
    assert [(r.name, r.status) for r in runs] == [("newer", "done"), ("paused", "unfinished"), ("stopped", "stopped"),
                                                   ("older", "done")]
    facts = runs[0].facts()
    assert (facts["seed"], facts["ranks"], facts["frames"], facts["peak_memory_mib"]) == (7, 2, 16, [1.0, 2.0])
    assert runs[0].row()[:2] == ["newer", "done"] and runs[0].row()[-1] == "a red circle moving right"
    for name in ("../secret/secret", "leak", "settings", ""):
        with pytest.raises(ValueError):
            find_run(base, name)
    studio = Studio(base, limits=LIMITS)
    assert studio.servable(runs[0].video) == str(base / "newer.mp4")
    assert studio.servable(outside / "secret.mp4") is None


def test_progress_of_all_ranks(tmp_path):
    assert read_progress(tmp_path).describe() == "starting the ranks"
    ranks = [ProgressReporter(rank, 2, tmp_path) for rank in range(2)]
    assert read_progress(tmp_path).phase == "loading"
    for reporter in ranks:
        reporter.denoising(steps=10, start_step=4)  # a resumed run: 4 steps were done before
    ranks[0].step_done(5)
    ranks[1].step_done(4)
    progress = read_progress(tmp_path)
    assert (progress.phase, progress.step, progress.steps, progress.ranks_reporting) == ("denoising", 5, 10, 2)
    assert progress.seconds_per_step is not None and progress.eta_s == pytest.approx(progress.seconds_per_step * 5)
    assert progress.describe().startswith("denoising: step 5/10")
    ranks[0].phase("decoding")
    assert read_progress(tmp_path).phase == "denoising"  # the slowest rank decides
    ranks[1].phase("decoding")
    assert read_progress(tmp_path).describe() == "decoding, 10/10 steps (2/2 ranks)"
    (tmp_path / "rank1.json").write_text("{half-written")
    assert read_progress(tmp_path).ranks_reporting == 1


def test_only_loopback_is_quiet():
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    assert "anyone who can reach" in exposure_warning("0.0.0.0")


def test_serve_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["serve", "--port", "7999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("video-infinity: error: the web UI needs Gradio") and "video-infinity[ui]" in err
    assert "\n" not in err


def test_serve_refuses_a_bad_config_or_ceiling(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pipe_configs": {"prompts": ["a"], "height": 65}}))
    assert main(["serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        "video-infinity: error: pipe_configs.height: must be a positive multiple of 8, got 65 (use e.g. 64 or 72)")
    assert main(["serve", "--max-frames", "0"]) == 2
    assert "--max-frames: must be a positive number" in capsys.readouterr().err


def test_widget_values_become_a_typed_form():
    form = form_from_values({0: "a"}, {"num_frames": 16.0, "height": "64", "padding": None, "phase_t": "", "loop": 1,
                                       "guidance_scale": 5, "model": None, "devices": 2})
    assert (form.num_frames, form.height, form.padding, form.phase_t, form.loop) == (16, 64, None, None, True)
    assert (form.guidance_scale, form.model, form.devices) == (5.0, "", "2")
    for values, words in [({"steps": 2.5}, "pipe_configs.steps: must be a whole number"),
                          ({"seed": None}, "seed: a number is required"),
                          ({"width": "wide"}, "pipe_configs.width: must be a number")]:
        with pytest.raises(FormError, match=words):
            form_from_values({0: "a"}, values)


def test_resume_refuses_a_run_without_a_checkpoint_or_with_a_broken_config(tmp_path):
    base = tmp_path / "runs"
    base.mkdir()
    studio = Studio(base, limits=LIMITS)
    (base / "stopped.config.json").write_text(json.dumps(_config(tmp=base).model_dump(mode="json")))
    with pytest.raises(FormError, match="stopped has no checkpoint to resume"):
        studio.resume("stopped")
    (base / "broken.config.json").write_text(json.dumps({"pipe_configs": {"prompts": ["a"], "height": 65}}))
    (base / "broken.ckpt").write_bytes(b"x")
    with pytest.raises(FormError, match="cannot resume 'broken': pipe_configs.height"):
        studio.resume("broken")
    with pytest.raises(FormError, match="no run called"):
        studio.resume("missing")


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> Path:
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def test_image_uploads_go_into_the_config_and_come_back(tmp_path):
    first, last = _png(tmp_path / "first.png"), _png(tmp_path / "last.png", (20, 30, 200))
    form = GenerationForm(**{**FORM.__dict__, "image": str(first), "last_image": str(last)})
    config = _config(form)
    assert (config.pipe_configs.image, config.pipe_configs.last_image) == (str(first), str(last))
    assert config.model_dump(mode="json")["pipe_configs"]["image"] == str(first)  # the file names it by path
    back = form_from_config(config.model_dump(mode="json"))
    assert (back.image, back.last_image) == (str(first), str(last))
    assert _config(back) == config
    # An empty upload is no image, whatever the server's --config has.
    plain = run_config(FORM, base_path="/tmp/never-written", file_name="clip", limits=LIMITS, template=config)
    assert plain.pipe_configs.image is None and plain.pipe_configs.last_image is None
    assert form_from_config(plain).image == "" and _config().pipe_configs.image is None
    # Widget values: an upload's path, or None for an empty one.
    widgets = form_from_values({0: "a"}, {"image": str(first), "last_image": None})
    assert (widgets.image, widgets.last_image) == (str(first), "")


@pytest.mark.parametrize("changes, field, words", [
    ({"image": "/no/such/first.png"}, "image", "pipe_configs.image: no file at '/no/such/first.png'"),
    ({"last_image": "LAST"}, "last_image", "pipe_configs.last_image: needs image (the first frame) too"),
])
def test_image_refusals_name_their_upload(tmp_path, changes, field, words):
    changes = {k: str(_png(tmp_path / "last.png")) if v == "LAST" else v for k, v in changes.items()}
    with pytest.raises(FormError) as info:
        _config(GenerationForm(**{**FORM.__dict__, **changes}))
    assert (info.value.field, str(info.value).startswith(words), "\n" in str(info.value)) == (field, True, False), (
        str(info.value))


def test_the_preflight_refuses_an_image_for_the_text_to_video_demo_model_and_an_unreadable_one(tmp_path):
    from video_infinity.demo import default_model_path

    studio = Studio(tmp_path / "runs", limits=LIMITS)
    with pytest.raises(FormError) as info:
        studio.check(GenerationForm(**{**FORM.__dict__, "image": str(_png(tmp_path / "first.png"))}))
    assert info.value.field == "image"
    assert str(info.value) == (f"pipe_configs.image: {default_model_path()} is a text-to-video model (its transformer "
                               "takes no image); use an image-to-video model or leave image out")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(FormError, match=r"^pipe_configs\.image: cannot read '.*notes.png' as an image") as info:
        studio.check(GenerationForm(**{**FORM.__dict__, "image": str(tmp_path / "notes.png")}))
    assert info.value.field == "image" and not list((tmp_path / "runs").glob("*"))  # nothing written


def test_a_run_keeps_copies_of_its_images_and_use_these_settings_restores_those_that_exist(tmp_path):
    base = tmp_path / "runs"
    base.mkdir()
    studio = Studio(base, limits=LIMITS)
    upload = _png(tmp_path / "upload.PNG")  # an upload in Gradio's cache, say
    kept = studio.keep_images(GenerationForm(**{**FORM.__dict__, "image": str(upload)}), "clip")
    assert kept.image == str(base / "clip.image.png") and kept.last_image == ""
    assert (base / "clip.image.png").read_bytes() == upload.read_bytes()

    config = _config(kept, tmp=base).model_dump(mode="json")
    _sidecar(base, "clip", config, age=10)
    form, notes = studio.settings("clip")
    assert (form.image, form.last_image, notes) == (str(base / "clip.image.png"), "", [])
    assert form == GenerationForm(**{**form_from_config(config).__dict__})
    # An image outside base_path is not handed out; a deleted one is left out; the rest still loads.
    config["pipe_configs"]["last_image"] = str(upload)
    _sidecar(base, "outside", config, age=5)
    form, notes = studio.settings("outside")
    assert (form.image, form.last_image) == (str(base / "clip.image.png"), "")
    assert notes == [f"pipe_configs.last_image: {upload} is outside this server's base_path; upload it on the page"]
    (base / "clip.image.png").unlink()
    form, notes = studio.settings("clip")
    assert form.image == "" and form.steps == FORM.steps and form.prompts == FORM.prompts
    assert notes == [f"pipe_configs.image: {base / 'clip.image.png'} no longer exists; upload the image again"]
