"""The quality probe on ground-truth procedural videos: colour, direction, wrap-around, border jumps,
and the ``inspect`` command with its contact sheet."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from video_infinity.demo import data, probe
from video_infinity.video_io import VideoWriter


@pytest.mark.parametrize("colour,shape,direction", data.all_classes())
def test_probe_reads_colour_and_direction_of_every_class(colour, shape, direction):
    rng = np.random.default_rng(len(colour) * 7 + len(shape) * 3 + len(direction))
    spec = data.VideoSpec(colour, shape, direction, *rng.uniform(0, data.SIZE, 2))
    report = probe.analyse(data.render(spec, 40))  # 40 frames at 4 px: crosses the frame edge 2.5 times
    assert report.colour == colour and report.colour_fraction > 0.9
    assert report.direction == direction
    assert report.median_step == pytest.approx(data.SPEED, abs=0.3)  # wrap-around does not count as a jump
    assert report.found_frames == 40


@pytest.mark.parametrize("direction", list(data.DIRECTIONS))
def test_probe_reads_videos_with_a_motion_trail(direction):
    """The demo model trains on clips with a fading trail; the probe must not be misled by the ghosts."""
    spec = data.VideoSpec("blue", "circle", direction, 13.0, 41.0)
    frames = data.render(spec, 24, trail=data.TRAIL)
    report = probe.analyse(frames)
    assert (report.colour, report.direction) == ("blue", direction)
    assert report.median_step == pytest.approx(data.SPEED, abs=0.3)


def test_trail_lies_behind_the_shape():
    spec = data.VideoSpec("red", "square", "right", 32.0, 32.0)
    plain = data.shape_mask(spec, 1)[0]
    trailed = data.shape_mask(spec, 1, trail=data.TRAIL)[0]
    ghost = trailed - plain
    assert np.all(ghost >= 0) and ghost.max() == pytest.approx(max(o for _, o in data.TRAIL))
    columns = np.nonzero(ghost.sum(axis=0) > 0)[0]
    assert columns.max() < 32 and columns.min() >= 32 - (data.SHAPE_SIZE / 2 + data.TRAIL[-1][0] * data.SPEED) - 1
    assert np.array_equal(data.render(spec, 3), data.render(spec, 3, trail=data.NO_TRAIL))


def test_border_jump_is_measured_against_the_inside_step():
    spec = data.VideoSpec("green", "square", "left", 20.0, 30.0)
    smooth = data.render(spec, 32)
    jumped = np.concatenate([smooth[:16], data.render(data.VideoSpec("green", "square", "left", 52.0, 10.0), 16)])
    continuous = probe.analyse(smooth, ranks=2)
    broken = probe.analyse(jumped, clip_frames=16)
    assert continuous.borders == broken.borders == [16]
    assert continuous.border_ratio == pytest.approx(1.0, abs=0.1)
    assert broken.border_ratio > 4
    assert broken.direction == "left"  # the border step is not an inside-clip step


@pytest.mark.unit
def test_wrap_jump_is_the_step_from_the_last_frame_back_to_the_first():
    spec = data.VideoSpec("red", "circle", "right", 10.0, 30.0)
    laps = int(data.SIZE / data.SPEED)  # frames for exactly one lap of the frame: a seamless loop
    seamless = probe.analyse(data.render(spec, laps), ranks=2)
    assert seamless.wrap_jump == pytest.approx(data.SPEED, abs=0.3)
    assert seamless.wrap_ratio == pytest.approx(1.0, abs=0.1)
    # Half a lap more: the last frame's object is 23 steps on, 28 px (the short way) from the first's.
    broken = probe.analyse(data.render(spec, laps + 8), ranks=2)
    expected = abs((-(laps + 7) * data.SPEED + data.SIZE / 2) % data.SIZE - data.SIZE / 2)
    assert broken.wrap_jump == pytest.approx(expected, abs=0.5) and expected > 5 * data.SPEED
    assert broken.wrap_ratio > 5
    assert "wrap jump / median step" in probe.format_report(broken)


def test_inspect_command_reports_and_writes_a_contact_sheet(tmp_path):
    frames = data.render(data.VideoSpec("yellow", "triangle", "down", 10.0, 5.0), 48)
    video = tmp_path / "v.mp4"
    with VideoWriter(video, data.SIZE, data.SIZE, 8) as writer:
        writer.write(frames)
    sheet = tmp_path / "sheet.png"
    done = subprocess.run([sys.executable, "-m", "video_infinity.cli", "inspect", str(video), "--ranks", "3", "--json",
                           "--contact-sheet", str(sheet)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["colour"], report["direction"], report["borders"]) == ("yellow", "down", [16, 32])
    assert report["border_ratio"] < 1.5
    with Image.open(sheet) as png:
        grid = np.asarray(png.convert("RGB"))
    assert grid.shape == (4 * data.SIZE, 8 * data.SIZE, 3)  # 32 of the 48 frames, 8 per row
    # The first tile is frame 0 (through H.264, so close, not equal).
    assert np.abs(grid[: data.SIZE, : data.SIZE].astype(int) - frames[0].astype(int)).mean() < 6


def test_clip_borders_of_a_video_split_in_latent_frames():
    """Wan splits latent frames: latent frame 0 is video frame 0, latent frame L >= 1 video frames
    4L-3..4L, so a clip starting at latent frame L starts at video frame 4(L-1)+1."""
    assert probe.clip_borders(129, ranks=2, temporal_compression=4) == [65]  # 33 latent frames: 17 + 16
    assert probe.clip_borders(17, ranks=3, temporal_compression=4) == [5, 13]  # 5 latent frames: 2 + 2 + 1
    assert probe.clip_borders(128, ranks=2) == [64]  # a UNet's video frames, as before
    with pytest.raises(ValueError, match="128 frames are not 4k \\+ 1"):
        probe.clip_borders(128, ranks=2, temporal_compression=4)


def test_inspect_reads_the_temporal_compression_from_the_sidecar(tmp_path):
    frames = data.render(data.VideoSpec("red", "circle", "right", 10.0, 30.0), 17)
    video = tmp_path / "v.mp4"
    with VideoWriter(video, data.SIZE, data.SIZE, 8) as writer:
        writer.write(frames)

    def borders() -> list[int]:
        return json.loads(probe.inspect_video(str(video), ranks=3, as_json=True))["borders"]

    assert borders() == [6, 12]  # no sidecar: split in video frames
    (tmp_path / "v.json").write_text(json.dumps({"temporal_compression": 4, "clip_borders": [5, 13]}))
    assert borders() == [5, 13]
    (tmp_path / "v.json").write_text(json.dumps({"total_frames": 17, "frames_per_rank": [2, 2, 1]}))  # an older sidecar
    assert borders() == [5, 13]
    assert json.loads(probe.inspect_video(str(video), ranks=3, as_json=True, temporal_compression=1))["borders"] == [6, 12]
