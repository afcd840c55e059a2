"""Checkpoint and resume through the Python API, on the embedded demo model: a call stopped by an
exception from ``callback_on_step_end`` keeps its last checkpoint, and ``resume=True`` runs only the
remaining steps and gives the frames of an uninterrupted call bit for bit, on one process (across
world sizes, for every family: test_conformance). A checkpoint saved by other arguments is refused
with one line naming them.

6 frames of 32x32, 4 steps of the stochastic DPM-Solver++ (it keeps a history of model outputs
and draws noise at every step: the hard case to resume); checkpoints every 2 steps, stopped after
the third step, so resuming starts at step 2.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from video_infinity import VideoInfinityPipeline
from video_infinity.checkpoint import FILE_NAME, load_checkpoint
from video_infinity.errors import CheckpointError

PROMPT = {0: "a red circle moving right", 3: "a blue square moving up"}
CALL = dict(num_frames=6, height=32, width=32, num_inference_steps=4, guidance_scale=3.0, seed=7,
            scheduler="sde-dpmsolver++", progress=False)
EVERY, STOP_AFTER_INDEX = 2, 2  # the checkpoint of step 2 is the last before the stop


class Crash(Exception):
    """What the callback raises to stop a call mid-denoising."""


def _crash_after_step(pipe, index, timestep, kwargs):
    if index == STOP_AFTER_INDEX:
        raise Crash(f"stopped after step {index}")
    return {}


@pytest.fixture(scope="module")
def pipe():
    return VideoInfinityPipeline.from_pretrained(device="cpu")  # the embedded demo model


@pytest.fixture(scope="module")
def reference(pipe):
    """The frames of an uninterrupted call without checkpoints."""
    return pipe(PROMPT, **CALL).frames[0]


@pytest.fixture(scope="module")
def stopped_once(pipe, tmp_path_factory) -> Path:
    """A checkpoint folder left by a call that raised in its callback after step 3."""
    folder = tmp_path_factory.mktemp("stopped")
    with pytest.raises(Crash):
        pipe(PROMPT, checkpoint_dir=folder, checkpoint_every=EVERY, callback_on_step_end=_crash_after_step, **CALL)
    return folder


@pytest.fixture
def stopped(stopped_once, tmp_path) -> Path:
    """A copy of that folder for one test (a completed resume removes the checkpoint)."""
    return Path(shutil.copytree(stopped_once, tmp_path / "stopped"))


@pytest.mark.unit
def test_resume_after_a_crash_runs_the_remaining_steps_and_gives_the_same_frames(pipe, reference, stopped):
    saved = load_checkpoint(stopped / FILE_NAME)
    assert saved["step"] == EVERY and saved["num_steps"] == CALL["num_inference_steps"] and saved["world_size"] == 1
    assert saved["latents"].shape == (1, 4, 6, 8, 8)  # the whole video, per latent frame
    assert len(saved["scheduler_tensors"]) >= 1  # DPM-Solver's model outputs
    seen = []
    # seed=None: a rerun of a random-seed call takes the checkpoint's seed.
    resumed = pipe(PROMPT, checkpoint_dir=stopped, resume=True, **{**CALL, "seed": None},
                   callback_on_step_end=lambda p, index, t, kwargs: seen.append(index) or {}).frames[0]
    assert seen == [2, 3]  # only the remaining steps ran
    assert np.array_equal(resumed, reference)
    assert not (stopped / FILE_NAME).exists()  # the call is complete: its checkpoint is gone


@pytest.mark.unit
def test_resume_without_a_checkpoint_starts_from_the_first_step(pipe, reference, tmp_path, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="video_infinity.pipeline"):
        video = pipe(PROMPT, checkpoint_dir=tmp_path / "new", resume=True, **CALL,
                     callback_on_step_end=lambda p, index, t, kwargs: seen.append(index) or {}).frames[0]
    assert seen == [0, 1, 2, 3] and np.array_equal(video, reference)
    assert "no checkpoint in" in caplog.text and "starting from the first step" in caplog.text
    assert list((tmp_path / "new").iterdir()) == []  # saved every step, removed at the end


@pytest.mark.unit
@pytest.mark.parametrize("change, differs", [
    ({"seed": 8}, "seed"),
    ({"num_inference_steps": 5}, "num_inference_steps"),
    ({"prompt": "a green triangle moving left"}, "prompt"),
    ({"engine": {"attn": {"padding": 1, "top_k": 2}}}, "engine.attn.padding"),
])
def test_a_checkpoint_of_other_arguments_is_refused_with_one_line(pipe, stopped, change, differs):
    change = dict(change)
    prompt = change.pop("prompt", PROMPT)
    engine = change.pop("engine", None)
    caller = pipe if engine is None else VideoInfinityPipeline.from_pretrained(device="cpu", engine=engine)
    before = (stopped / FILE_NAME).read_bytes()
    with pytest.raises(CheckpointError) as error:
        caller(prompt, checkpoint_dir=stopped, resume=True, **{**CALL, **change})
    message = str(error.value)
    assert "\n" not in message and "differs in: " in message and differs in message.split("differs in: ")[1]
    assert str(stopped / FILE_NAME) in message
    assert (stopped / FILE_NAME).read_bytes() == before  # kept as it was


@pytest.mark.unit
def test_a_new_call_does_not_overwrite_an_unfinished_checkpoint(pipe, stopped):
    before = (stopped / FILE_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="resume=True"):
        pipe(PROMPT, checkpoint_dir=stopped, **CALL)
    assert (stopped / FILE_NAME).read_bytes() == before
    with pytest.raises(ValueError, match="checkpoint_dir"):
        pipe(PROMPT, resume=True, **CALL)


@pytest.mark.unit
def test_the_cli_preflight_computes_the_fingerprint_the_pipeline_saves(pipe):
    # The CLI refuses a foreign --resume checkpoint before any rank starts, from its config alone;
    # its ranks save and check the pipeline's fingerprint: both must agree on every setting.
    from video_infinity.run.checkpoint import config_fingerprint
    from video_infinity.run.config import RunConfig
    from video_infinity.run.preflight import resolve_model

    config = RunConfig.model_validate({
        "dtype": "float32", "devices": ["cpu"] * 2, "seed": 9, "plugin_configs": {"attn": {"padding": 1, "top_k": 2}},
        "pipe_configs": {"prompts": {0: "a red circle", 4: "a blue square"}, "negative_prompt": "blurry", "steps": 3,
                         "guidance_scale": 4, "num_frames": 3, "height": 32, "width": 32, "fps": 8,
                         "scheduler": "ddim", "eta": 0.5, "transition_frames": 1, "keyframe_mode": "hold"},
    })
    # What the CLI's ranks compute (run/rank.py): the config's request on 2 ranks, through the pipeline.
    request = config.request.model_copy(update={"num_frames": config.pipe_configs.total_frames_for(2)})
    pipe.check_inputs(request, world_size=2)
    ours = pipe.checkpoint_fingerprint(request, seed=config.seed, scheduler=request.scheduler,
                                       engine=request.engine_for(config.plugin_configs))
    assert config_fingerprint(config, resolve_model(config), 2, "float32") == ours
    assert config_fingerprint(config, resolve_model(config), 3, "float32")["num_frames"] == 9  # 3 per device
