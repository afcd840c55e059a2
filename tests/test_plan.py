"""``video-infinity plan``: a run's memory per rank and stage and its FLOPs, from the model folder's
config files alone (meta tensors), checked against a real run's measured peak; the verdict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import build_tiny_wan_folder


FRAMES = 41  # 11 latent frames


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Wan folder with its weights, and a copy holding its JSON config files only."""
    root = tmp_path_factory.mktemp("plan")
    full = build_tiny_wan_folder(root / "full")
    configs = root / "configs-only"
    for path in full.rglob("*.json"):
        (configs / path.relative_to(full)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, configs / path.relative_to(full))
    assert not list(configs.rglob("*.safetensors"))
    return full, configs


@pytest.fixture(scope="module")
def wide_folder(folders, tmp_path_factory):
    """The tiny folder with a transformer wide enough (512 channels, 256 tokens per latent frame at
    256x256) that one step's working memory (tens of MB) stands well above a process's noise."""
    import torch
    from diffusers import WanTransformer3DModel

    from tiny_models import TEXT_DIM

    wide = tmp_path_factory.mktemp("plan-wide") / "pipe"
    shutil.copytree(folders[0], wide)
    shutil.rmtree(wide / "transformer")
    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=4,
                          out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=2048, num_layers=2,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                          rope_max_seq_len=32).save_pretrained(wide / "transformer")
    return wide


def _config(model: Path, devices: list, engine: object = "wan", **pipe) -> dict:
    return {"model": str(model), "dtype": "float32", "devices": devices, "plugin_configs": engine,
            "pipe_configs": {"prompts": ["a cat runs on the beach"], "steps": 4, "guidance_scale": 5.0,
                             "total_frames": FRAMES, "height": 64, "width": 64, **pipe}}


def _plan(model: Path, devices: list, gpu_memory: int | None = None, engine: object = "wan", **pipe):
    from video_infinity.plan import plan_run
    from video_infinity.run.config import RunConfig

    return plan_run(RunConfig.model_validate(_config(model, devices, engine, **pipe)), gpu_memory)


@pytest.mark.unit
def test_a_folder_of_config_files_plans_like_the_full_folder(folders):
    full, configs = folders
    planned, from_configs = _plan(full, [0, 1, 2]), _plan(configs, [0, 1, 2])
    assert planned.as_dict() | {"model": ""} == from_configs.as_dict() | {"model": ""}
    assert [r.latent_frames for r in planned.ranks] == [4, 4, 3]
    assert [s.name for s in planned.ranks[0].stages] == ["prompt encoding", "denoising step", "VAE decode"]
    assert [s.name for s in planned.ranks[1].stages] == ["denoising step", "VAE decode"]
    assert planned.step_flops > 0 and planned.total_flops > 3 * planned.step_flops


@pytest.mark.unit
def test_memory_grows_with_the_clip_and_shrinks_with_more_ranks(wide_folder):
    size = dict(height=256, width=256)
    one = _plan(wide_folder, [0], **size).ranks[0].stage("denoising step").working_bytes
    longer = _plan(wide_folder, [0], total_frames=2 * FRAMES - 1, **size).ranks[0].stage("denoising step").working_bytes
    three = max(r.stage("denoising step").working_bytes for r in _plan(wide_folder, [0, 1, 2], **size).ranks)
    assert longer > 1.5 * one and three < 0.75 * one


@pytest.mark.unit
def test_verdict_fits_or_names_the_ranks_needed(wide_folder):
    run = dict(height=256, width=256, total_frames=81, engine={"attn": {"padding": 2, "top_k": 2}})
    plan = _plan(wide_folder, [0], **run)
    assert plan.fits is None
    roomy = _plan(wide_folder, [0], gpu_memory=2 * plan.peak_bytes, **run)
    assert roomy.fits and roomy.verdict.startswith("fits")
    step = plan.ranks[0].stage("denoising step")
    tight = _plan(wide_folder, [0], gpu_memory=int((step.weights_bytes + 0.6 * step.working_bytes) / 0.9), **run)
    assert tight.fits is False and tight.needs_ranks in (2, 4, 8) and f"needs {tight.needs_ranks} ranks" in tight.verdict
    from video_infinity.plan import refusal

    line = refusal(tight)
    assert line.startswith("devices: the run needs") and f"use {tight.needs_ranks} GPUs" in line and "\n" not in line
    hopeless = _plan(wide_folder, [0], gpu_memory=step.weights_bytes, **run)
    assert hopeless.fits is False and hopeless.needs_ranks is None and "offload" in hopeless.verdict


@pytest.mark.e2e
def test_planned_step_is_within_15_percent_of_the_measured_peak_on_cpu(wide_folder):
    """One denoising step on real CPU tensors (the same engine settings, fused kernels), its peak
    resident memory above the loaded model measured by the kernel (VmHWM, in a fresh process),
    against the plan computed on meta tensors."""
    full = wide_folder
    script = f"""
import ctypes, json, sys, torch
from pathlib import Path
from video_infinity import ClipContext, parallelize
from video_infinity.families.wan.family import WanFamily
from video_infinity.presets import resolve_engine
torch.set_num_threads(1)
family = WanFamily.load({str(full)!r}, None, torch.float32, torch.device("cpu"))
model = family.transformer
engine = resolve_engine("wan").model_copy(update={{"split_invariant": False}})
parallelize(model, engine, ClipContext(total_frames=11))
x = torch.randn(1, model.config.in_channels, 11, 32, 32)
text = torch.randn(1, 512, model.config.text_dim)
t = torch.tensor([500.0])
def status(field):
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)).split()[1]) * 1024
def step():
    with torch.no_grad():
        pred = model(x, t, text).sample
        uncond = model(x, t, text).sample
        return uncond + 5.0 * (pred - uncond)
step()  # kernels' one-time set-up is not the step's memory
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the warm-up freed goes back to the system
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
step()
print(json.dumps(status("VmHWM") - base))
"""
    # glibc's malloc serves big blocks with their own mappings, returned when freed (a fixed threshold:
    # the dynamic one would move them into its heap, whose freed gaps count as resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    measured = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                         timeout=300, env=env).stdout.strip().splitlines()[-1])
    planned = _plan(full, ["cpu"], height=256, width=256).ranks[0].stage("denoising step").working_bytes
    print(f"one step: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


@pytest.mark.e2e
def test_cli_plan_prints_the_plan_and_refuses_bad_input(folders, tmp_path, offline_env):
    full, configs = folders
    (tmp_path / "run.json").write_text(json.dumps(_config(configs, [0, 1])))
    cli = [sys.executable, "-m", "video_infinity.cli", "plan", "--config", str(tmp_path / "run.json")]
    result = subprocess.run([*cli, "--gpu-memory", "80GiB", "--json"], env=offline_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and [r["rank"] for r in plan["ranks"]] == [0, 1]
    assert plan == json.loads(json.dumps(_plan(configs, [0, 1], gpu_memory=80 * 2**30).as_dict()))
    bad = subprocess.run([*cli, "--gpu-memory", "lots"], env=offline_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--gpu-memory" in bad.stderr


@pytest.mark.unit
def test_the_plan_reads_as_one_line_per_rank(folders):
    text = _plan(folders[1], [0, 1]).describe()
    assert "rank 0 (" in text and "rank 1 (" in text and "prompt encoding" in text and "denoising step" in text
    assert "TFLOP per step" in text and text.splitlines()[-1].startswith("no GPU memory given")


@pytest.mark.unit
def test_preflight_refuses_a_gpu_run_that_cannot_fit_before_loading(wide_folder):
    """The run's pre-flight plans a GPU run from the folder's configs and refuses it in one line naming
    the numbers and the ranks it needs; a run that fits passes (the GPU's memory given: no GPU here)."""
    from video_infinity.errors import ConfigError
    from video_infinity.run.config import RunConfig
    from video_infinity.run.preflight import check_memory

    run = dict(height=256, width=256, total_frames=81, engine={"attn": {"padding": 2, "top_k": 2}})
    config = RunConfig.model_validate(_config(wide_folder, [0], **run))
    step = _plan(wide_folder, [0], **run).ranks[0].stage("denoising step")
    check_memory(config, str(wide_folder), 1, gpu_memory=4 * (step.weights_bytes + step.working_bytes))
    with pytest.raises(ConfigError, match=r"^devices: the run needs [0-9.]+ GiB on rank 0 \(denoising step: .* use [248] GPUs"):
        check_memory(config, str(wide_folder), 1, gpu_memory=int((step.weights_bytes + 0.6 * step.working_bytes) / 0.9))


@pytest.mark.unit
def test_the_shipped_wan_1_3b_configs_plan_81_frames_at_480x832_on_24_gib():
    """``examples/model_configs/Wan2.1-T2V-1.3B`` (configs only): 1.42 B transformer parameters (2.65 GiB
    in bf16, its float32 modules aside), UMT5-XXL's 5.7 B, and the plan's verdict on a 24 GiB card."""
    folder = Path(__file__).resolve().parent.parent / "examples" / "model_configs" / "Wan2.1-T2V-1.3B"
    from video_infinity.plan import plan_run
    from video_infinity.run.config import RunConfig

    config = RunConfig.model_validate({**_config(folder, [0], total_frames=81, height=480, width=832), "dtype": "bfloat16"})
    plan = plan_run(config, 24 * 2**30)
    rank = plan.ranks[0]
    text, step = rank.stage("prompt encoding"), rank.stage("denoising step")
    assert 2.6 * 2**30 < step.weights_bytes < 3.3 * 2**30  # and the VAE's 0.47 GiB (float32)
    assert 10.0 * 2**30 < text.weights_bytes - step.weights_bytes < 11.0 * 2**30  # UMT5-XXL in bf16
    assert plan.fits and plan.latent_frames == 21


@pytest.mark.unit
def test_the_shipped_wan_i2v_14b_configs_plan_the_image_conditioning_on_every_rank(tmp_path):
    """``examples/model_configs/Wan2.1-I2V-14B-480P`` with a start image on 2 ranks: every rank plans its
    condition video's encode (its own latent frames after the encoder's warm-up), rank 0 also CLIP's
    ViT-H (0.63 B parameters, float32)."""
    from PIL import Image

    from video_infinity.plan import plan_run
    from video_infinity.run.config import RunConfig

    folder = Path(__file__).resolve().parent.parent / "examples" / "model_configs" / "Wan2.1-I2V-14B-480P"
    Image.new("RGB", (832, 480)).save(tmp_path / "first.png")
    base = {**_config(folder, [0, 1], total_frames=81, height=480, width=832), "dtype": "bfloat16"}
    with_image = {**base, "pipe_configs": {**base["pipe_configs"], "image": str(tmp_path / "first.png")}}
    plan = plan_run(RunConfig.model_validate(with_image), 80 * 2**30, search=False)
    first, second = (rank.stage("image conditioning") for rank in plan.ranks)
    clip = first.weights_bytes - second.weights_bytes
    assert 2.2 * 2**30 < clip < 2.5 * 2**30  # CLIP ViT-H/14 in float32 on rank 0 only
    # rank 0 encodes its 11 latent frames (and runs CLIP); rank 1 its 10 after a warm-up on all 11 before
    # them (the encoder's receptive field, 28, reaches the video's start)
    assert second.flops > first.flops > 0
    step = plan.ranks[0].stage("denoising step")
    assert 30 * 2**30 < step.weights_bytes < 33 * 2**30  # 16.4 B parameters in bf16 and the VAE
