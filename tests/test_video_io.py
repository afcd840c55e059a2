"""Video and image file I/O: streaming atomic MP4 writer, decoder, contact sheet, PNG, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from video_infinity.atomic import write_json_atomic
from video_infinity.video_io import VideoWriter, contact_sheet, read_video, videos_sheet, write_png


def _smooth_frames(n: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([128 + 100 * np.sin(x / 10 + t / 3), 128 + 100 * np.cos(y / 8 - t / 4),
                  128 + 60 * np.sin((x + y) / 15)], axis=-1)
        for t in range(n)
    ]
    return np.stack(frames).astype(np.uint8)


def test_write_and_read_back(tmp_path: Path) -> None:
    frames = _smooth_frames(10, 48, 64)
    path = tmp_path / "out.mp4"
    with VideoWriter(path, width=64, height=48, fps=8) as writer:
        writer.write(frames[:3])  # streamed in pieces
        writer.write(frames[3])
        writer.write(frames[4:])
        assert not path.exists()  # appears only when complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    decoded, fps = read_video(path)
    assert decoded.shape == (10, 48, 64, 3) and decoded.dtype == np.uint8
    assert fps == 8.0
    assert np.abs(decoded.astype(np.float64) - frames).mean() < 6
    with av.open(str(path)) as container:
        ctx = container.streams.video[0].codec_context
        assert ctx.name == "h264" and ctx.pix_fmt == "yuv420p"


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, width=64, height=48, fps=8) as writer:
            writer.write(_smooth_frames(4, 48, 64))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_failure(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        with VideoWriter(path, width=64, height=48, fps=8) as writer:
            writer.write(np.zeros((2, 48, 32, 3), np.uint8))  # wrong size
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_contact_sheet_and_png(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (100, 16, 24, 3), dtype=np.uint8)
    sheet = contact_sheet(frames, columns=8, max_frames=32)
    assert sheet.shape == (4 * 16, 8 * 24, 3)
    assert np.array_equal(sheet[:16, :24], frames[0]) and np.array_equal(sheet[-16:, -24:], frames[-1])
    assert contact_sheet(frames[:3], columns=8).shape == (16, 3 * 24, 3)
    assert contact_sheet(frames[:10], columns=4).shape == (3 * 16, 4 * 24, 3)

    write_png(tmp_path / "sheet.png", sheet)
    with Image.open(tmp_path / "sheet.png") as png:  # decoded back: the same pixels
        assert png.format == "PNG"
        assert np.array_equal(np.asarray(png.convert("RGB")), sheet)


def test_videos_sheet_has_one_row_per_video() -> None:
    videos = np.random.default_rng(1).integers(0, 256, (3, 16, 8, 10, 3), dtype=np.uint8)
    sheet = videos_sheet(videos, frames_per_row=4)
    assert sheet.shape == (3 * 8, 4 * 10, 3)
    for i, video in enumerate(videos):  # first and last frame of each video open and close its row
        assert np.array_equal(sheet[i * 8:(i + 1) * 8, :10], video[0])
        assert np.array_equal(sheet[i * 8:(i + 1) * 8, -10:], video[-1])


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"a": 1, "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "path": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]

