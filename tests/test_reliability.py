"""Reliability, end to end with real processes on CPU: a killed rank, Ctrl-C, checkpoints and resume,
and user mistakes (each one line on stderr and exit code 2, never a traceback).

The runs use a tiny random model, 6 frames of 32x32 and 8 steps. The generated video is compared
bit for bit through its saved latents; the H.264 encoder is not deterministic from process to
process (identical frames can encode to slightly different pictures), so decoded MP4s are
compared by PSNR. The kills land mid-denoising through the pipeline's test hooks (see
``cli_utils.Interrupted``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cli_utils import Interrupted, ok, one_line_error, our_lines, run_cli, sets
from video_infinity.checkpoint import load_checkpoint
from video_infinity.demo.random_model import build_random_model
from video_infinity.video_io import read_video

pytestmark = pytest.mark.e2e

STEPS, EVERY, FRAMES = 8, 2, 6


@pytest.fixture(scope="module")
def env(offline_env):
    return offline_env


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    build_random_model(root / "model", seed=0)
    config = {
        "dtype": "float32",
        "devices": ["cpu"] * 3,
        "seed": 5,
        "base_path": str(root / "out"),
        "model": str(root / "model"),
        "collective_timeout_s": 60,
        "pipe_configs": {
            "prompts": ["a red circle moving right", "a blue square moving up"],
            "steps": STEPS,
            "guidance_scale": 4.0,
            "total_frames": FRAMES,
            "height": 32,
            "width": 32,
            "file_name": "video",
            "transition_frames": 2,
            "scheduler": "sde-dpmsolver++",  # keeps a history of model outputs: the hard case to resume
            "save_latents": True,
            "checkpoint_every": EVERY,
        },
        "plugin_configs": {"attn": {"padding": 1, "top_k": 2}},
    }
    (root / "config.json").write_text(json.dumps(config))
    return root


def _run(root: Path, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(root / "config.json", env, *args, timeout=timeout)


def _interrupted(root: Path, env: dict, name: str, world: int, sig: int, target: str) -> Interrupted:
    """A run stopped by ``sig`` once every rank is past the checkpoint of step ``EVERY``."""
    return Interrupted(root / "config.json", root / "out", env, name, world, sig, target, after_step=EVERY + 1)


@pytest.fixture(scope="module")
def killed(root, env):
    """kill -9 of rank 1 of 3 after the checkpoint of step 2."""
    return _interrupted(root, env, "killed", world=3, sig=signal.SIGKILL, target="1")


@pytest.fixture(scope="module")
def interrupted(root, env):
    """Ctrl-C (SIGINT to the process group) of a 2-rank run after the checkpoint of step 2."""
    return _interrupted(root, env, "interrupted", world=2, sig=signal.SIGINT, target="group")


@pytest.fixture(scope="module")
def reference3(root, env):
    """An uninterrupted run on 3 ranks (without checkpoints)."""
    ok(_run(root, env, *sets(pipe_configs__file_name="reference3", pipe_configs__checkpoint_every=None)))
    return root / "out" / "reference3"


def _outputs(stem: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(f"{stem}.latents.npy"), read_video(f"{stem}.mp4")[0]


def test_killed_rank_stops_the_run_with_one_line(killed):
    print(f"kill -9 of rank 1 of 3: the launcher exited {killed.seconds:.2f} s later")
    assert killed.seconds < 30
    message = one_line_error(killed.result(), 1, "rank 1 was killed (SIGKILL)", "--resume")
    assert message.startswith("video-infinity: error: ")
    killed.assert_clean()


def test_ctrl_c_stops_every_rank_and_keeps_the_checkpoint(interrupted):
    print(f"Ctrl-C of 2 ranks: the launcher exited {interrupted.seconds:.2f} s later")
    assert interrupted.seconds < 10
    one_line_error(interrupted.result(), 130, "interrupted", "--resume")
    interrupted.assert_clean()
    checkpoint = load_checkpoint(interrupted.copy)
    assert checkpoint["step"] % EVERY == 0 and 0 < checkpoint["step"] < STEPS
    assert checkpoint["latents"].shape[2] == FRAMES and checkpoint["world_size"] == 2


def test_killed_launcher_leaves_no_rank_behind(root, env):
    run = _interrupted(root, env, "launcher-killed", world=2, sig=signal.SIGKILL, target="launcher")
    print(f"launcher killed: its {len(run.processes)} descendants gone within 5 s")
    assert len(run.processes) >= 2  # the two ranks (and the fork server) were running when it was killed
    assert not run.left_behind, run.left_behind
    assert not run.video_written


def _assert_same_video(frames: np.ndarray, reference: np.ndarray) -> None:
    # Bit-identical latents decode to identical frames; only x264 can tell them apart (> 30 dB).
    assert frames.shape == reference.shape
    error = ((frames.astype(np.float64) - reference.astype(np.float64)) ** 2).mean()
    assert 10 * np.log10(255**2 / max(error, 1e-12)) > 30


def test_resume_after_a_kill_is_bit_identical(root, env, killed, reference3):
    checkpoint = Path(f"{killed.stem}.ckpt")
    saved_step = load_checkpoint(checkpoint)["step"]
    ok(_run(root, env, "--resume", str(checkpoint), *sets(pipe_configs__file_name="killed")))
    latents, frames = _outputs(killed.stem)
    reference_latents, reference_frames = _outputs(reference3)
    np.testing.assert_array_equal(latents, reference_latents)
    _assert_same_video(frames, reference_frames)
    sidecar = json.loads(killed.stem.with_suffix(".json").read_text())
    # It really resumed: from the saved step, of a checkpoint written by 3 ranks, continued on 3.
    assert 0 < saved_step < STEPS
    assert sidecar["resumed_from"]["step"] == saved_step
    assert sidecar["resumed_from"]["saved_by_world_size"] == 3 and sidecar["resumed_from"]["world_size"] == 3
    assert not checkpoint.exists()  # the video is complete: its checkpoint is gone


def test_resume_on_another_world_size(root, env, interrupted, reference3):
    # Saved by 2 ranks, continued by 3: bit-identical to an uninterrupted 3-rank run, since on CPU
    # the engine's results do not depend on the number of ranks.
    saved_step = load_checkpoint(f"{interrupted.stem}.ckpt")["step"]
    ok(_run(root, env, "--resume", f"{interrupted.stem}.ckpt", *sets(pipe_configs__file_name="interrupted")))
    resumed = json.loads(interrupted.stem.with_suffix(".json").read_text())["resumed_from"]
    assert resumed["step"] == saved_step and 0 < saved_step < STEPS
    assert resumed["saved_by_world_size"] == 2 and resumed["world_size"] == 3
    latents, frames = _outputs(interrupted.stem)
    reference_latents, reference_frames = _outputs(reference3)
    np.testing.assert_array_equal(latents, reference_latents)
    _assert_same_video(frames, reference_frames)


@pytest.mark.parametrize("change, differs", [
    ({"seed": 6}, "seed"),
    ({"pipe_configs__steps": STEPS + 2}, "pipe_configs.steps"),
    ({"model": "model2"}, "model"),
])
def test_checkpoint_from_another_config_or_model_is_refused(root, env, killed, change, differs):
    if change.get("model") == "model2":
        if not (root / "model2").exists():
            build_random_model(root / "model2", seed=1)  # same shapes and sizes, other weights
        change = {"model": str(root / "model2")}
    result = _run(root, env, "--resume", str(killed.copy), *sets(pipe_configs__file_name="other", **change))
    one_line_error(result, 2, "different config or model", differs)
    assert not (root / "out" / "other.mp4").exists()


def test_unfinished_checkpoint_is_not_overwritten_by_a_new_run(root, env, killed):
    checkpoint = root / "out" / "unfinished.ckpt"
    shutil.copy(killed.copy, checkpoint)
    result = _run(root, env, *sets(pipe_configs__file_name="unfinished"))
    one_line_error(result, 2, "--resume", "--overwrite")
    assert checkpoint.read_bytes() == killed.copy.read_bytes()


def test_broken_checkpoint_file_is_refused(root, env, tmp_path, killed):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    one_line_error(_run(root, env, "--resume", str(broken)), 2, "not a video-infinity checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(killed.copy.read_bytes()[:-100])
    one_line_error(_run(root, env, "--resume", str(truncated)), 2, "checkpoint")


# --------------------------------------------------------------------------------------------------
# User mistakes: one line, exit code 2, nothing written


@pytest.mark.parametrize("name", ["../escape", "sub/video", "/tmp/absolute", ".."])
def test_file_name_outside_base_path_is_refused(root, env, tmp_path, name):
    base = tmp_path / "base"
    result = _run(root, env, *sets(base_path=str(base), pipe_configs__file_name=name))
    one_line_error(result, 2, "pipe_configs.file_name")
    assert not base.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_base_path_is_refused(root, env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_error(_run(root, env, *sets(base_path=str(blocker / "out"))), 2, "base_path", "cannot create")
    one_line_error(_run(root, env, *sets(base_path=str(blocker))), 2, "base_path", "not a folder")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        one_line_error(_run(root, env, *sets(base_path=str(locked))), 2, "base_path", "not writable")


def _broken_model(root: Path, tmp_path: Path, breakage: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    if breakage == "truncated weights":
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage == "missing config":
        (model / "vae" / "config.json").unlink()
    elif breakage == "corrupt config":
        (model / "scheduler" / "scheduler_config.json").write_text("{not json")
    elif breakage == "missing folder":
        shutil.rmtree(model)
    return model


@pytest.mark.parametrize("breakage, words", [
    ("truncated weights", ["model", "unet/diffusion_pytorch_model.safetensors", "truncated"]),
    ("missing config", ["model", "missing vae/config.json"]),
    ("corrupt config", ["model", "scheduler/scheduler_config.json", "invalid JSON"]),
    ("missing folder", ["model", "does not exist"]),
])
def test_broken_model_is_refused_before_any_rank_starts(root, env, tmp_path, breakage, words):
    model = _broken_model(root, tmp_path, breakage)
    started = time.monotonic()
    result = _run(root, env, *sets(model=str(model), base_path=str(tmp_path / "out")))
    one_line_error(result, 2, *words)
    assert time.monotonic() - started < 20  # no rank was started (each would import torch and diffusers)
    assert not (tmp_path / "out" / "video.mp4").exists()


def test_model_with_wrong_shapes_fails_in_the_ranks_with_one_line(root, env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["cross_attention_dim"] *= 2  # the weights no longer fit the config
    (model / "unet" / "config.json").write_text(json.dumps(config))
    result = _run(root, env, *sets(model=str(model), base_path=str(tmp_path / "out"), devices=["cpu"] * 2))
    one_line_error(result, 2, "cannot load unet")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_is_kept_without_overwrite(root, env, reference3):
    video = reference3.with_suffix(".mp4")
    before = video.read_bytes()
    result = _run(root, env, *sets(pipe_configs__file_name="reference3"))
    one_line_error(result, 2, "exists", "--overwrite")
    assert video.read_bytes() == before


def test_too_little_disk_space_is_refused(root, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    from video_infinity import cli

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr("video_infinity.run.preflight.shutil.disk_usage", lambda path: usage._replace(free=10_000))
    code = cli.main(["generate", "--config", str(root / "config.json"), *sets(base_path=str(tmp_path / "out"))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    ours = our_lines(err)
    assert len(ours) == 1 and "not enough disk space" in ours[0] and "checkpoint" in ours[0], err


def test_out_of_memory_names_the_knobs_to_lower(root):
    import torch

    from video_infinity.run.config import load_run_config
    from video_infinity.run.failures import describe_failure

    config = load_run_config(root / "config.json")
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    kind, message, code = describe_failure(error, config, 3, "cuda:1")
    assert kind == "oom" and code == 1 and "\n" not in message
    for knob in ("GPU memory on cuda:1", "frames per device", "num_frames", "total_frames", "height", "width", "dtype"):
        assert knob in message, message


def test_the_root_cause_is_reported_not_its_echoes(tmp_path, root):
    """A rank's own error beats a rank killed by a signal, which beats ranks that lost their peers."""
    from types import SimpleNamespace

    from video_infinity.run.supervise import root_cause

    def report(rank, kind, message, at, code=1):
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"kind": kind, "message": message, "time": at, "code": code}))

    procs = [SimpleNamespace(exitcode=code) for code in (1, 1, -signal.SIGTERM, 1)]
    report(0, "peer", "lost contact with the other ranks (Connection closed by peer)", 1.0)
    report(1, "error", "ValueError: boom", 2.0)
    report(3, "peer", "lost contact with the other ranks", 0.5)
    assert root_cause(procs, {2}, tmp_path) == ("rank 1 failed: ValueError: boom", 1, 1)
    (tmp_path / "rank1.json").unlink()
    procs[1] = SimpleNamespace(exitcode=-signal.SIGKILL)
    assert root_cause(procs, {2}, tmp_path) == ("rank 1 was killed (SIGKILL)", 1, 1)
    procs[1] = SimpleNamespace(exitcode=-signal.SIGTERM)
    text, _, rank = root_cause(procs, {1, 2}, tmp_path)
    assert text.startswith("rank 3 failed: lost contact") and rank == 3
    report(2, "user", "cannot load unet from 'x': shapes differ", 3.0, code=2)
    assert root_cause(procs, {1}, tmp_path) == ("cannot load unet from 'x': shapes differ", 2, 2)


def test_only_the_runs_own_new_temporary_files_are_removed(tmp_path, root):
    from video_infinity.atomic import temp_path
    from video_infinity.run.config import load_run_config
    from video_infinity.run.outputs import output_paths
    from video_infinity.run.supervise import remove_new_temp_files, temp_files

    config = load_run_config(root / "config.json", [f"base_path={json.dumps(str(tmp_path))}"])
    paths = output_paths(config)
    older = temp_path(paths["video"])  # another run's: there before this one started
    before = temp_files(paths)
    new = [temp_path(paths[kind]) for kind in ("video", "checkpoint", "sidecar", "latents")]
    assert all(path.name.endswith(".part") for path in new)  # the suffix the writers use
    unrelated = temp_path(tmp_path / "other.mp4")
    user_file = tmp_path / ".video.mp4.notes"  # the user's, not a temporary file of ours
    user_file.touch()
    remove_new_temp_files(paths, before)
    assert older.exists() and unrelated.exists() and user_file.exists()
    assert not any(path.exists() for path in new)


@pytest.mark.unit
def test_launchers_hold_their_rendezvous_port_from_the_start():
    """Two runs started at once with the same master_port: the second gets another port at once
    (the first holds its socket until rank 0's store takes it over), and a port whose last run's
    connections linger in TIME_WAIT is used again."""
    import socket

    from video_infinity.run.supervise import rendezvous_socket

    first = rendezvous_socket(0)
    port = first.getsockname()[1]
    second = rendezvous_socket(port)
    try:
        assert second.getsockname()[1] != port
        for listening in (first, second):  # both accept connections: what the ranks' stores need
            with socket.create_connection(listening.getsockname(), timeout=5):
                listening.accept()[0].close()  # closed by the server first: the port is in TIME_WAIT
    finally:
        first.close()
        second.close()
    again = rendezvous_socket(port)
    try:
        assert again.getsockname()[1] == port
    finally:
        again.close()
