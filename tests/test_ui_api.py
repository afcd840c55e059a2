"""The web UI's ``generate`` endpoint through ``gradio_client``, against ``video-infinity serve``
started as a user would: a real generation with the embedded demo model on 2 CPU processes, the
same video on 1 (while a second request waits in the queue), refusals before anything starts, and
what the server hands out; a start image: refused for the text-to-video demo model, made into a
video by a tiny Wan2.2 TI2V folder."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ui_utils import Server
from video_infinity.demo import default_model_path
from video_infinity.video_io import read_video

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

TIMELINE = json.dumps({"0": "a red circle moving right", "8": "a green circle moving right"})
SMALL = dict(num_frames=16, height=64, width=64, steps=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory, offline_env):
    base = tmp_path_factory.mktemp("ui-api") / "runs"
    # Slow steps: the queue test needs a run that lasts while a second request arrives.
    server = Server(base, offline_env, "--max-frames", "256", "--test-step-sleep", "0.5")
    yield server
    server.stop()
    assert not server.runs_left()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def two_ranks(client):
    return client.predict(prompts=TIMELINE, devices="2", seed=11, **SMALL, api_name="/generate")


def test_endpoint_generates_a_video_and_returns_its_sidecar(server, two_ranks):
    video, sidecar = two_ranks
    frames, fps = read_video(video)
    assert frames.shape == (16, 64, 64, 3) and fps == pytest.approx(8)
    assert frames.std() > 5  # a picture, not a blank
    assert (sidecar["world_size"], sidecar["seed"], sidecar["total_frames"]) == (2, 11, 16)
    assert sidecar["config"]["pipe_configs"]["prompts"] == json.loads(TIMELINE)
    assert sidecar["frames_per_rank"] == [8, 8] and len(sidecar["peak_memory_bytes"]) == 2
    written = server.base / sidecar["video"]
    assert written.is_file() and (server.base / (written.stem + ".png")).is_file()  # the contact sheet


def test_same_seed_same_video_on_one_process_while_another_request_waits_in_the_queue(server, client, two_ranks):
    one_rank = client.submit(prompts=TIMELINE, devices="1", seed=11, **SMALL, api_name="/generate")
    deadline = time.monotonic() + 60
    while one_rank.status().code in (Status.STARTING, Status.JOINING_QUEUE) and time.monotonic() < deadline:
        time.sleep(0.05)
    # One generation at a time: a second request waits (this one is refused once its turn comes).
    waiting = client.submit(prompts=TIMELINE, devices="1", **{**SMALL, "height": 65}, api_name="/generate")
    positions = []
    while not one_rank.done() and time.monotonic() < deadline:
        update = waiting.status()
        if update.code == Status.IN_QUEUE and update.rank is not None:
            positions.append(update.rank)
        time.sleep(0.05)
    assert positions and positions[0] == 0, positions  # next in line while the first one runs
    with pytest.raises(AppError, match="pipe_configs.height"):
        waiting.result(timeout=60)

    video, sidecar = one_rank.result(timeout=120)
    assert sidecar["world_size"] == 1
    one, two = read_video(video)[0].astype(float), read_video(two_ranks[0])[0].astype(float)
    # Bit-identical latents; the H.264 encoder differs slightly from process to process.
    psnr = 10 * np.log10(255**2 / max(np.mean((one - two) ** 2), 1e-12))
    assert psnr > 40, psnr


@pytest.mark.parametrize("values, message", [
    ({"height": 65}, "pipe_configs.height: must be a positive multiple of 8, got 65 (use e.g. 64 or 72)"),
    ({"num_frames": 300}, "pipe_configs.total_frames: at most 256 frames on this server, got 300 "
                          "(serve --max-frames raises it)"),
    ({"devices": "0"}, 'devices: at least 1 process, got 0 (give a number of CPU processes ("2") or GPU ids ("gpu:0,1"))'),
    ({"model": "/no/such/model"}, "model: folder '/no/such/model' does not exist"),
    ({"prompts": '{"4": "no start"}'}, 'pipe_configs.prompts: a {"frame": "prompt"} dict needs a prompt for frame 0'),
])
def test_bad_values_are_refused_with_the_cli_message_and_nothing_starts(server, client, values, message):
    before = sorted(p.name for p in server.base.iterdir())
    with pytest.raises(AppError) as info:
        client.predict(**{"prompts": TIMELINE, "devices": "1", **SMALL, **values}, api_name="/generate")
    assert str(info.value) == message
    assert sorted(p.name for p in server.base.iterdir()) == before
    assert not server.runs_left()


def test_only_files_under_base_path_are_served(server, two_ranks):
    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{server.url}gradio_api/file={path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(server.base / two_ranks[1]["video"]) == 200
    outside = server.base.parent / "private.txt"
    outside.write_text("not for the web")
    assert status(outside) in (403, 404)
    assert status(Path("/etc/passwd")) in (403, 404)


def _png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_an_image_for_the_text_to_video_demo_model_is_refused_in_one_line_and_nothing_starts(server, client, tmp_path):
    before = sorted(p.name for p in server.base.iterdir())
    with pytest.raises(AppError) as info:
        client.predict(prompts=TIMELINE, devices="1", **SMALL, image=handle_file(str(_png(tmp_path / "first.png"))),
                       api_name="/generate")
    assert str(info.value) == (f"pipe_configs.image: {default_model_path()} is a text-to-video model (its transformer "
                               "takes no image); use an image-to-video model or leave image out")
    assert sorted(p.name for p in server.base.iterdir()) == before
    assert not server.runs_left()


def test_a_start_image_makes_a_wan_ti2v_video_whose_sidecar_records_it(server, client, tmp_path):
    from tiny_models import build_tiny_wan_i2v_folder

    model = build_tiny_wan_i2v_folder(tmp_path / "ti2v", "ti2v")  # Wan2.2 TI2V: an image is optional
    first = _png(tmp_path / "first.png", (48, 32))
    call = dict(prompts="a cat runs on the beach", num_frames=9, height=32, width=48, steps=1, devices="1", seed=3,
                guidance_scale=3.0, model=str(model), preset="wan", image=handle_file(str(first)), api_name="/generate")
    with pytest.raises(AppError, match=r"^pipe_configs\.last_image: .* conditions on its first frames only"):
        client.predict(**call, last_image=handle_file(str(first)))
    video, sidecar = client.predict(**call)
    frames, fps = read_video(video)
    assert frames.shape == (9, 32, 48, 3) and fps == pytest.approx(8)
    assert sidecar["family"] == "wan" and sidecar["total_frames"] == 9
    # The run keeps its own copy of the upload beside its video: the config and the sidecar name it.
    stem = Path(sidecar["video"]).stem
    kept = server.base.resolve() / f"{stem}.image.png"
    assert kept.read_bytes() == first.read_bytes()
    assert sidecar["request"]["image"] == f"{kept} (sha256 {hashlib.sha256(first.read_bytes()).hexdigest()[:16]})"
    assert sidecar["request"]["last_image"] is None and sidecar["config"]["pipe_configs"]["image"] == str(kept)
    saved = json.loads((server.base / f"{stem}.config.json").read_text())
    assert saved["pipe_configs"]["image"] == str(kept)
