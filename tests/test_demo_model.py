"""The shipped demo model: it loads through the real loader and its videos follow the prompt.

Fast (a few seconds): 8 frames at 64x64 with few sampling steps, through ``load_model``, the engine
(``parallelize``) and ``denoise``; the quality probe checks the object's colour and direction.
"""

from __future__ import annotations

import numpy as np
import pytest

from video_infinity.demo import WEIGHTS_DIR, data, probe

pytestmark = pytest.mark.skipif(
    not (WEIGHTS_DIR / "model_index.json").is_file(), reason="no trained demo model shipped in demo/weights/"
)

# (colour, shape, direction, seed): every colour, shape and direction; fixed seeds, so the test is
# deterministic on a given machine.
CASES = [("red", "circle", "right", 1), ("blue", "square", "down", 2), ("green", "triangle", "left", 3),
         ("yellow", "circle", "up", 4)]
SETTINGS = dict(frames=8, steps=10, guidance=5.0, scheduler_name="dpmsolver++")


@pytest.fixture(scope="module")
def pipe():
    from video_infinity import VideoInfinityPipeline

    return VideoInfinityPipeline.from_pretrained(WEIGHTS_DIR, device="cpu")


def test_default_model_is_the_shipped_one():
    from video_infinity.demo import default_model_path

    assert default_model_path() == WEIGHTS_DIR


def test_shipped_weights_are_small_safetensors():
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"unet", "vae", "text_encoder"}
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024


def test_scheduler_config_is_v_prediction_zero_snr(pipe):
    config = pipe.family.scheduler_config
    assert config["prediction_type"] == "v_prediction"
    assert config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"


def _probe(pipe, colour, shape, direction, seed):
    from video_infinity.demo.evaluate import generate

    videos = generate(pipe, [data.caption(colour, shape, direction)], [seed], **SETTINGS)
    assert videos.shape == (1, SETTINGS["frames"], data.SIZE, data.SIZE, 3)
    assert videos.dtype == np.uint8
    return probe.analyse(videos[0])


@pytest.mark.parametrize("colour,shape,direction,seed", CASES)
def test_generates_the_prompted_colour(pipe, colour, shape, direction, seed):
    report = _probe(pipe, colour, shape, direction, seed)
    assert report.found_frames == SETTINGS["frames"], report  # one object, visible in every frame
    assert report.colour == colour, report


@pytest.mark.parametrize("colour,shape,direction,seed", CASES)
def test_generates_the_prompted_direction(pipe, colour, shape, direction, seed):
    report = _probe(pipe, colour, shape, direction, seed)
    assert report.direction == direction, report
    # Moving at about the training speed (4 px/frame), not jittering in place.
    assert 2.0 <= report.median_step <= 6.0, report
