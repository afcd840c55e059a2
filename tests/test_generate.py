"""End to end: the CLI and launcher on CPU ranks, with a tiny random model saved to disk and loaded back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from video_infinity.video_io import read_video

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FRAMES, HEIGHT, WIDTH, EXPORT_FPS = 10, 64, 48, 6


@pytest.fixture(scope="module")
def env(offline_env):
    return offline_env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("generate")
    model = tiny_model
    config = {
        "dtype": "float32",
        "devices": ["cpu", "cpu"],
        "seed": 11,
        "base_path": str(root / "out"),
        "model": str(model),
        "pipe_configs": {
            "prompts": ["a red circle moving right", "a blue square moving up"],
            "steps": 3,
            "guidance_scale": 4.0,
            "fps": 8,
            "total_frames": FRAMES,
            "height": HEIGHT,
            "width": WIDTH,
            "export_fps": EXPORT_FPS,
            "file_name": "world2",
            "transition_frames": 2,
            "scheduler": "sde-dpmsolver++-karras",
            "save_latents": True,
        },
        "plugin_configs": {"attn": {"padding": 2, "top_k": 3, "token_num_scale": True}},
    }
    (root / "config.json").write_text(json.dumps(config))
    return root


def _run(args: list[str], env: dict, cwd: Path = ROOT, timeout: int = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def _generate(workdir: Path, env: dict, name: str, *overrides: str) -> Path:
    _run([str(BIN / "video-infinity"), "generate", "--config", str(workdir / "config.json"),
          "--set", f"pipe_configs.file_name={name}", *[x for o in overrides for x in ("--set", o)]], env)
    return workdir / "out" / name


@pytest.fixture(scope="module")
def world2(workdir, env):
    return _generate(workdir, env, "world2")


def test_two_cpu_ranks_write_a_decodable_mp4_and_sidecar(world2):
    frames, fps = read_video(world2.with_suffix(".mp4"))
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert fps == EXPORT_FPS
    assert frames.std() > 1  # not a blank video
    sidecar = json.loads(world2.with_suffix(".json").read_text())
    assert sidecar["world_size"] == 2 and sidecar["frames_per_rank"] == [5, 5]
    assert sidecar["total_frames"] == FRAMES and sidecar["seed"] == 11
    assert set(sidecar["versions"]) >= {"video_infinity", "torch", "diffusers"}
    assert sidecar["seconds"]["denoise"] > 0 and sidecar["frames_per_second"] > 0
    assert len(sidecar["peak_memory_bytes"]) == 2 and all(b > 0 for b in sidecar["peak_memory_bytes"])
    assert all(b > 0 for b in sidecar["bytes_sent"])  # halos, GroupNorm statistics and global frames moved
    latents = np.load(Path(str(world2) + ".latents.npy"))
    assert latents.dtype == np.float32 and latents.shape == (4, FRAMES, HEIGHT // 8, WIDTH // 8)
    assert not list(world2.parent.glob(".*.part"))  # no temporary file left (the writers' suffix)


@pytest.mark.parametrize("devices", ['["cpu"]', '["cpu","cpu","cpu"]'])
def test_same_video_on_one_two_and_three_ranks(workdir, env, world2, devices):
    other = _generate(workdir, env, f"world{devices.count('cpu')}", f"devices={devices}")
    reference = np.load(Path(str(world2) + ".latents.npy"))
    latents = np.load(Path(str(other) + ".latents.npy"))
    np.testing.assert_array_equal(latents, reference)  # bit for bit on CPU, whatever the number of ranks
    # Same frames to the encoder; x264 output bytes can still vary from run to run (see the torchrun
    # test), so the decoded videos are compared by PSNR.
    frames, _ = read_video(other.with_suffix(".mp4"))
    reference_frames, _ = read_video(world2.with_suffix(".mp4"))
    assert frames.shape == reference_frames.shape
    error = (frames.astype(np.float64) - reference_frames.astype(np.float64)) ** 2
    assert 10 * np.log10(255**2 / max(error.mean(), 1e-12)) > 35


def test_torchrun_gives_the_same_video_as_the_builtin_launcher(workdir, env, world2):
    name = "torchrun2"
    _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "video_infinity.cli", "generate",
          "--config", str(workdir / "config.json"), "--set", f"pipe_configs.file_name={name}"], env)
    latents = np.load(workdir / "out" / f"{name}.latents.npy")
    np.testing.assert_array_equal(latents, np.load(Path(str(world2) + ".latents.npy")))
    frames, _ = read_video(workdir / "out" / f"{name}.mp4")
    # The latents above are bit-identical. x264 at this width reads uninitialised padding, so
    # identical frames can encode to slightly different bytes: compare the decoded frames by PSNR.
    error = (frames.astype(np.float64) - read_video(world2.with_suffix(".mp4"))[0].astype(np.float64)) ** 2
    assert 10 * np.log10(255**2 / max(error.mean(), 1e-12)) > 35


def test_original_example_runs_through_inference_py_on_cpu(workdir, env, tiny_model):
    # The original's single-GPU example, unchanged but for the device, the model and a small size.
    _run([sys.executable, "inference.py", "--config", "examples/single_gpu.json",
          "--set", 'devices=["cpu"]', "--set", f"model={tiny_model}", "--set", "base_model=null",
          "--set", f"base_path={workdir / 'original'}", "--set", "pipe_configs.file_name=original",
          "--set", "pipe_configs.steps=2", "--set", "pipe_configs.num_frames=4",
          "--set", "pipe_configs.height=32", "--set", "pipe_configs.width=32"], env)
    frames, fps = read_video(workdir / "original" / "original.mp4")
    assert frames.shape == (4, 32, 32, 3) and fps == 8


def _refused(args: list[str], env: dict) -> str:
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_existing_output_is_not_overwritten(workdir, env, world2):
    before = world2.with_suffix(".mp4").read_bytes()
    stderr = _refused([str(BIN / "video-infinity"), "generate", "--config", str(workdir / "config.json")], env)
    assert "--overwrite" in stderr
    assert world2.with_suffix(".mp4").read_bytes() == before


@pytest.mark.parametrize("kept", ["sidecar", "latents"])
def test_an_existing_sidecar_or_latents_file_is_not_overwritten(workdir, env, kept):
    # Only the sidecar (or latents file) of an earlier run is there: the run must not replace it either.
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    name = f"lonely-{kept}"
    path = out / (f"{name}.json" if kept == "sidecar" else f"{name}.latents.npy")
    path.write_text("the user's file")
    stderr = _refused([str(BIN / "video-infinity"), "generate", "--config", str(workdir / "config.json"),
                       "--set", f"pipe_configs.file_name={name}"], env)
    assert str(path) in stderr and "--overwrite" in stderr
    assert path.read_text() == "the user's file" and not (out / f"{name}.mp4").exists()


def test_the_config_being_run_is_never_an_output(workdir, env, tmp_path):
    # The config saved as <base_path>/demo.json and run with file_name "demo": its sidecar would be the config.
    config = json.loads((workdir / "config.json").read_text())
    config["base_path"] = str(tmp_path)
    config["pipe_configs"]["file_name"] = "demo"
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(config))
    before = path.read_bytes()
    stderr = _refused([str(BIN / "video-infinity"), "generate", "--config", str(path), "--overwrite"], env)
    assert "config file being run" in stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]


def test_an_existing_contact_sheet_is_not_overwritten(world2, env, tmp_path):
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"the user's picture")
    stderr = _refused([str(BIN / "video-infinity"), "inspect", str(world2.with_suffix(".mp4")), "--contact-sheet",
                       str(sheet)], env)
    assert "--overwrite" in stderr and sheet.read_bytes() == b"the user's picture"
