"""Wan family pieces: frame rule, folder recognition, rank-0 text encoding, the parallel VAE decode
(equal to vae.decode of the whole latent video), both experts against diffusers' WanPipeline, and the
CLI on a tiny folder. Parity with WanPipeline and worlds 1-4: test_conformance."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline

from cli_utils import Interrupted, ok, one_line_error, run_cli, sets
from harness import run_distributed
from video_infinity.context import ClipContext
from video_infinity import VideoInfinityPipeline
from video_infinity.engine.comm import broadcast_from_rank0
from video_infinity.families.wan.vae import (
    decode_wan_clip,
    decode_wan_window,
    denormalize_wan_latents,
    latent_frame_count,
    video_frame_count,
    video_frames_of,
    wan_decoder_receptive_field,
)
from video_infinity.noise import frame_noise
from video_infinity.checkpoint import load_checkpoint
from video_infinity.run.config import load_run_config
from video_infinity.run.preflight import estimate_output_bytes
from video_infinity.schedulers import make_scheduler
from video_infinity.families import detect, unsupported_model
from video_infinity.video_io import read_video
from tiny_models import build_tiny_wan_folder


# ----------------------------------------------------------------------------------- frames, folder
@pytest.mark.unit
def test_frame_rule_and_sizes():
    assert [latent_frame_count(n) for n in (1, 5, 81, 1025)] == [1, 2, 21, 257]
    assert all(video_frame_count(latent_frame_count(n)) == n for n in (1, 5, 81, 1025))
    # 21 latent frames on 3 ranks: the ranks' video frames tile the 81 frames
    assert [video_frames_of(r) for r in (range(0, 7), range(7, 14), range(14, 21))] == [
        range(0, 25), range(25, 53), range(53, 81)]
    with pytest.raises(ValueError, match=r"num_frames.*use 77 or 81"):
        latent_frame_count(80)
    with pytest.raises(ValueError, match=r"use 81 or 85"):
        latent_frame_count(82)


@pytest.mark.unit
def test_tiny_folder_is_recognised_with_its_scheduler_and_checked_sizes(wan_folder, tmp_path):
    assert detect(wan_folder).family == "wan"
    (tmp_path / "model_index.json").write_text('{"_class_name": "TextToVideoSDPipeline"}')
    assert detect(tmp_path).family == "unet3d"
    pipe = VideoInfinityPipeline.from_pretrained(wan_folder, device="cpu")
    assert pipe.family.name == "wan" and pipe.family.text_pipeline is None  # the encoder loads on first use
    scheduler = pipe.make_scheduler(None)  # the family's default: the folder's own flow-matching UniPC
    assert type(scheduler).__name__ == "UniPCMultistepScheduler" and scheduler.config.flow_shift == 3.0
    assert make_scheduler("model", {**pipe.family.scheduler_config, "flow_shift": 5.0}).config.flow_shift == 5.0
    common = dict(num_inference_steps=1, guidance_scale=1.0)
    assert pipe.latent_frames(pipe.check_inputs("a cat", num_frames=17, height=32, width=48, **common)) == 5
    with pytest.raises(ValueError, match=r"num_frames.*use 13 or 17"):
        pipe.check_inputs("a cat", num_frames=16, height=32, width=48, **common)
    with pytest.raises(ValueError, match=r"width: must be a positive multiple of 16"):
        pipe.check_inputs("a cat", num_frames=17, height=32, width=40, **common)


def _config_only_folder(path, index: dict, **configs: dict):
    """A pipeline folder of config files only (no weights): what the refusal of a model reads."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps(index))
    for component, config in configs.items():
        (path / component).mkdir()
        (path / component / "config.json").write_text(json.dumps(config))
    return path


# As diffusers saves Wan2.1-I2V-14B-480P-Diffusers: a CLIP image encoder, an image embedder in the
# transformer and the image latents concatenated to the noise (36 input, 16 output channels).
WAN_I2V_INDEX = {"_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModel"],
                 "image_processor": ["transformers", "CLIPImageProcessor"], "transformer": ["diffusers", "WanTransformer3DModel"],
                 "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
WAN_I2V_TRANSFORMER = {"_class_name": "WanTransformer3DModel", "image_dim": 1280, "in_channels": 36, "out_channels": 16}
SUPPORTED = ("supported: Wan text- and image-to-video (WanPipeline, WanImageToVideoPipeline), AnimateDiff "
             "(AnimateDiffPipeline, or a MotionAdapter on Stable Diffusion 1.5) and UNet3D text-to-video "
             "(TextToVideoSDPipeline)")  # the registry's order


@pytest.mark.unit
def test_wan_folders_are_judged_by_what_they_hold_and_other_pipelines_refused(wan_folder, tmp_path):
    t2v = {**WAN_I2V_INDEX, "_class_name": "WanPipeline"}
    del t2v["image_encoder"], t2v["image_processor"]
    vae = {"z_dim": 16, "scale_factor_temporal": 4}
    refusals = {
        "vace": (_config_only_folder(tmp_path / "vace", {**t2v, "_class_name": "WanVACEPipeline"}),
                 "holds a WanVACEPipeline (VACE (video editing and reference conditioning))"),
        "animate": (_config_only_folder(tmp_path / "animate", {**t2v, "_class_name": "WanAnimatePipeline"}),
                    "holds a WanAnimatePipeline (Wan-Animate (character animation))"),
        "no_image": (_config_only_folder(tmp_path / "no_image", {**WAN_I2V_INDEX, "image_encoder": [None, None]},
                                         transformer={"in_channels": 16, "out_channels": 16}, vae=vae),
                     "holds a WanImageToVideoPipeline (image-to-video, but its transformer takes no image "
                     "(in_channels = out_channels, no expand_timesteps))"),
        "channels": (_config_only_folder(tmp_path / "channels", t2v, transformer={"in_channels": 32, "out_channels": 16},
                                         vae=vae),
                     "holds a WanPipeline (transformer in_channels 32 is not out_channels 16 + 4 mask channels + 16 "
                     "image latent channels)"),
        "sd": (_config_only_folder(tmp_path / "sd", {"_class_name": "StableDiffusionPipeline",
                                                     "unet": ["diffusers", "UNet2DConditionModel"]}),
               "holds a StableDiffusionPipeline (unet UNet2DConditionModel)"),
        "flux": (_config_only_folder(tmp_path / "flux", {"_class_name": "FluxPipeline"},
                                     transformer={"_class_name": "FluxTransformer2DModel"}),
                 "holds a FluxPipeline (transformer FluxTransformer2DModel)"),
    }
    for name, (folder, what) in refusals.items():
        assert unsupported_model(folder) == f"model: '{folder}' {what}, which video-infinity does not run; {SUPPORTED}"
    i2v = _config_only_folder(tmp_path / "i2v", WAN_I2V_INDEX, transformer=WAN_I2V_TRANSFORMER, vae=vae)
    flf = _config_only_folder(tmp_path / "flf", WAN_I2V_INDEX, transformer={**WAN_I2V_TRANSFORMER, "pos_embed_seq_len": 514},
                              vae=vae)
    # Wan2.2 A14B I2V: no CLIP, mask and latents concatenated; judged by its transformer even saved as a WanPipeline
    a14b = _config_only_folder(tmp_path / "a14b", t2v, transformer={"in_channels": 36, "out_channels": 16}, vae=vae)
    ti2v = _config_only_folder(tmp_path / "ti2v", {**t2v, "expand_timesteps": True},
                               transformer={"in_channels": 48, "out_channels": 48}, vae={"z_dim": 48})
    facts = {name: detect(folder) for name, folder in (("i2v", i2v), ("flf", flf), ("a14b", a14b), ("ti2v", ti2v))}
    assert {name: (f.image_mode, f.image_required, f.last_image) for name, f in facts.items()} == {
        "i2v": ("concat", True, False), "flf": ("concat", True, True), "a14b": ("concat", True, True),
        "ti2v": ("first_frame", False, False)}
    assert facts["ti2v"].latent_channels == 48 and facts["i2v"].latent_channels == 16
    supported = [
        wan_folder, i2v, flf, a14b, ti2v,
        _config_only_folder(tmp_path / "wan22_t2v", t2v, transformer={"in_channels": 16, "out_channels": 16}),
        _config_only_folder(tmp_path / "ms", {"_class_name": "TextToVideoSDPipeline", "unet": ["diffusers", "UNet3DConditionModel"]}),
        # AnimateDiff's image_encoder is an optional IP-Adapter: still text-to-video
        _config_only_folder(tmp_path / "ad", {"_class_name": "AnimateDiffPipeline", "unet": ["diffusers", "UNetMotionModel"],
                                              "image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}),
        tmp_path / "no_index",  # a UNet-only folder or a missing one: judged elsewhere
    ]
    assert [unsupported_model(folder) for folder in supported] == [None] * len(supported)
    # The Python API refuses with the same line, before loading anything (the folder has no weights).
    with pytest.raises(ValueError) as refused:
        VideoInfinityPipeline.from_pretrained(refusals["vace"][0], device="cpu")
    assert str(refused.value) == unsupported_model(refusals["vace"][0])


# ----------------------------------------------------------------------------------- VAE
def _small_vae() -> AutoencoderKLWan:
    """4x temporal compression like Wan's VAE, fewer layers (receptive field 21 latent frames), so
    a test video can be longer than the receptive field and still decode in seconds."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=0, temperal_downsample=[True, True],
                           latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


VAE_LATENT_FRAMES = 33  # rank 2 of 3 starts at latent frame 22, past the receptive field (21)


def _decode_worker(rank: int, world_size: int, latents: torch.Tensor) -> dict:
    ctx = ClipContext.from_process_group(total_frames=latents.shape[2])
    own = ctx.frames

    def embeddings() -> torch.Tensor:  # what encode_wan_prompts hands to broadcast_from_rank0
        if rank != 0:
            raise AssertionError("only rank 0 may load the text encoder")
        return torch.arange(6, dtype=torch.float32).view(1, 2, 3)

    return {"video": decode_wan_clip(_small_vae(), latents[:, :, own.start : own.stop], ctx),
            "text": broadcast_from_rank0(ctx, embeddings, (1, 2, 3), torch.float32, "cpu")}


@pytest.mark.unit
def test_receptive_field_from_the_decoder_layers():
    with torch.device("meta"):
        wan21 = AutoencoderKLWan()  # Wan2.1's VAE config (diffusers' defaults)
    # conv_in 2 + mid block 8 + first up block 12 + its time conv 2, then at 2 frames per latent
    # 6 + 1, then at 4 frames per latent 3 + 3 + conv_out 0.5: 37.5 -> 38
    assert wan_decoder_receptive_field(wan21) == 38
    assert wan_decoder_receptive_field(_small_vae()) == 21


@pytest.mark.distributed
def test_parallel_decode_equals_whole_video_decode_and_text_comes_from_rank_zero(tmp_path):
    vae = _small_vae()
    latents = torch.randn(1, 4, VAE_LATENT_FRAMES, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = vae.decode(denormalize_wan_latents(vae, latents)).sample
    assert whole.shape[2] == video_frame_count(VAE_LATENT_FRAMES)
    # 3 ranks own latent frames
    # 0-10, 11-21, 22-32: rank 1's halo reaches the video's start, rank 2 warms up from latent frame 1
    # with fresh caches.
    parts = run_distributed(_decode_worker, 3, latents, tmp_dir=tmp_path)
    torch.testing.assert_close(torch.cat([p["video"] for p in parts], dim=2), whole, atol=1e-5, rtol=0)
    for part in parts:
        assert torch.equal(part["text"], torch.arange(6, dtype=torch.float32).view(1, 2, 3))
    # A halo one latent frame short of the receptive field is not exact: the halo is needed, and tight.
    start, halo = 23, wan_decoder_receptive_field(vae)
    for warm_up, exact in ((halo, True), (halo - 1, False)):
        with torch.no_grad():
            part = decode_wan_window(vae, denormalize_wan_latents(vae, latents[:, :, start - warm_up : start + 2]), warm_up)
        error = (part - whole[:, :, 1 + 4 * (start - 1) : 1 + 4 * (start + 1)]).abs().max()
        assert (error <= 1e-5) == exact, f"warm-up {warm_up}: error {error:.3g}"


# ----------------------------------------------------------------------------------- end to end
LATENT_FRAMES, NUM_FRAMES, SIZE, STEPS = 5, 17, 16, 2
CALL = dict(num_frames=NUM_FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0)
WHOLE_WINDOW = {"attn": {"padding": 100, "top_k": 0}}
BAND = {"attn": {"padding": 1, "top_k": 1}}
PROMPTS = ["a cat runs on the beach", "a dog jumps in snow"]  # multi-prompt: one embedding per latent frame


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan_folder") / "pipe")


@pytest.fixture(scope="module")
def two_expert_folder(tmp_path_factory):
    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan_a14b") / "pipe", two_experts=True)


@pytest.mark.unit
def test_whole_window_equals_diffusers_wan_pipeline_with_both_experts(two_expert_folder):
    # WanPipeline given the same initial latents. With flow_shift 3, 2 steps run at t = 999 and 750:
    # a boundary at 0.8 gives one step per expert (the folder's 0.5 would give both to the first).
    noise = frame_noise(4, range(LATENT_FRAMES), (1, 4, 2, 2))
    reference = WanPipeline.from_pretrained(two_expert_folder)
    reference.register_to_config(boundary_ratio=0.8)
    expected = reference("a cat runs on the beach", latents=noise, output_type="np", **CALL).frames[0]
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(reference, name).register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
             for name in calls]
    expected_latents = reference("a cat runs on the beach", latents=noise, output_type="latent", **CALL).frames
    for hook in hooks:
        hook.remove()
    assert calls == {"transformer": 2, "transformer_2": 2}  # conditional + unconditional pass per step

    pipe = VideoInfinityPipeline.from_pipe(reference, engine=WHOLE_WINDOW)
    assert pipe.family.denoisers == (reference.transformer, reference.transformer_2)
    latents = pipe("a cat runs on the beach", latents=noise, output_type="latent", progress=False, **CALL).frames[0]
    torch.testing.assert_close(latents, expected_latents[0], atol=1e-4, rtol=0)  # guidance 5 amplifies rounding
    frames = pipe("a cat runs on the beach", latents=noise, output_type="np", progress=False, **CALL).frames[0]
    assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3)
    np.testing.assert_allclose(frames, expected, atol=1e-4, rtol=0)


@pytest.mark.e2e
def test_cli_on_two_cpu_ranks_writes_the_expected_frame_count(wan_folder, tmp_path, offline_env):
    config = {
        "dtype": "float32", "devices": ["cpu", "cpu"], "seed": 3, "base_path": str(tmp_path / "out"),
        "model": str(wan_folder), "plugin_configs": "wan",
        "pipe_configs": {"prompts": PROMPTS, "steps": 1, "guidance_scale": 5.0, "total_frames": NUM_FRAMES,
                         "height": SIZE, "width": SIZE, "export_fps": 16, "file_name": "wan"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    cli = [sys.executable, "-m", "video_infinity.cli", "generate", "--config", str(tmp_path / "config.json")]
    result = subprocess.run(cli, env=offline_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    frames, fps = read_video(tmp_path / "out" / "wan.mp4")
    assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3) and fps == 16
    sidecar = json.loads((tmp_path / "out" / "wan.json").read_text())
    assert sidecar["family"] == "wan" and sidecar["total_frames"] == NUM_FRAMES
    assert sidecar["frames_per_rank"] == [3, 2]  # latent frames


@pytest.mark.e2e
@pytest.mark.parametrize("change, message", [
    ({"total_frames": 8}, r"pipe_configs\.total_frames: Wan videos have 4k\+1 frames; 8 is not one, use 5 or 9"),
    ({"height": 40}, r"pipe_configs\.height: this model needs a multiple of 16, got 40 \(use 32 or 48\)$"),
])
def test_cli_refuses_a_shape_wan_cannot_make_before_any_rank_starts(wan_folder, tmp_path, offline_env, change, message):
    pipe = {"prompts": PROMPTS, "steps": 1, "total_frames": NUM_FRAMES, "height": SIZE, "width": SIZE, **change}
    config = {"dtype": "float32", "devices": ["cpu", "cpu"], "base_path": str(tmp_path / "out"), "model": str(wan_folder),
              "pipe_configs": pipe}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cli = [sys.executable, "-m", "video_infinity.cli", "generate", "--config", str(tmp_path / "config.json")]
    result = subprocess.run(cli, env=offline_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.match(message, lines[0].removeprefix("video-infinity: error: ")), result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.e2e
def test_cli_resume_on_another_world_size_is_bit_identical(wan_folder, tmp_path, offline_env):
    # Checkpoints after every step, Ctrl-C on 2 ranks mid-denoising, --resume on 3 ranks: the final
    # latents equal an uninterrupted run's bit for bit. The flow-matching UniPC keeps a history of
    # model outputs and the last sample (per latent frame), re-split between the two world sizes.
    steps, out = 4, tmp_path / "out"
    config = {
        "dtype": "float32", "devices": ["cpu", "cpu"], "seed": 3, "base_path": str(out), "model": str(wan_folder),
        "plugin_configs": BAND, "collective_timeout_s": 60,
        "pipe_configs": {"prompts": PROMPTS, "steps": steps, "guidance_scale": 5.0, "total_frames": NUM_FRAMES,
                         "height": SIZE, "width": SIZE, "save_latents": True, "checkpoint_every": 1},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    stopped = Interrupted(tmp_path / "config.json", out, offline_env, "resumed", world=2, sig=signal.SIGINT,
                          target="group", after_step=2)
    one_line_error(stopped.result(), 130, "interrupted", "--resume")
    stopped.assert_clean()
    saved = load_checkpoint(stopped.copy)
    assert 2 <= saved["step"] < steps and saved["world_size"] == 2
    assert saved["latents"].shape == (1, 4, LATENT_FRAMES, 2, 2)  # latent frames, not video frames
    assert len(saved["scheduler_tensors"]) >= 2  # UniPC's model outputs and last sample, whole video
    assert all(t.shape == saved["latents"].shape for t in saved["scheduler_tensors"])

    checkpoint = f"{stopped.stem}.ckpt"
    ok(run_cli(tmp_path / "config.json", offline_env, "--resume", checkpoint,
               *sets(devices=["cpu"] * 3, pipe_configs__file_name="resumed")))
    ok(run_cli(tmp_path / "config.json", offline_env,
               *sets(devices=["cpu"], pipe_configs__file_name="reference", pipe_configs__checkpoint_every=None)))
    resumed, reference = (np.load(out / f"{name}.latents.npy") for name in ("resumed", "reference"))
    assert resumed.shape == (4, LATENT_FRAMES, 2, 2)
    np.testing.assert_array_equal(resumed, reference)
    sidecar = json.loads((out / "resumed.json").read_text())
    assert sidecar["resumed_from"] == {"checkpoint": checkpoint, "step": saved["step"], "saved_by_world_size": 2,
                                       "world_size": 3}
    assert sidecar["frames_per_rank"] == [2, 2, 1] and sidecar["total_frames"] == NUM_FRAMES
    assert not (out / "resumed.ckpt").exists()  # the video is complete: its checkpoint is gone
    # The pre-flight disk estimate counts Wan's latent layout (latent frames, the transformer's
    # channels, float32) and UniPC's history (solver_order model outputs + the last sample).
    needs = estimate_output_bytes(load_run_config(tmp_path / "config.json"), str(wan_folder))
    assert needs["latents"] == resumed.nbytes
    assert needs["checkpoint"] == 2 * sum(t.nbytes for t in [saved["latents"], *saved["scheduler_tensors"]])


@pytest.mark.e2e
def test_cli_refuses_a_vace_folder_before_any_rank_starts(tmp_path, offline_env):
    folder = _config_only_folder(tmp_path / "wan_vace", {**WAN_I2V_INDEX, "_class_name": "WanVACEPipeline"},
                                 transformer=WAN_I2V_TRANSFORMER)
    config = {"dtype": "float32", "devices": ["cpu", "cpu"], "base_path": str(tmp_path / "out"), "model": str(folder),
              "pipe_configs": {"prompts": PROMPTS, "steps": 1, "total_frames": NUM_FRAMES, "height": SIZE, "width": SIZE}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = one_line_error(run_cli(tmp_path / "config.json", offline_env), 2, "WanVACEPipeline", "VACE")
    assert line == f"video-infinity: error: {unsupported_model(folder)}"
    assert line.startswith(f"video-infinity: error: model: '{folder}' ") and line.endswith(SUPPORTED)
    assert not (tmp_path / "out").exists()  # nothing written, not even the output folder


@pytest.mark.unit
def test_streamed_decode_is_vae_decode_bit_for_bit_one_latent_frame_at_a_time():
    """The decode streams each latent frame's video frames (1, then 4 each) as they are made, never the
    whole video; their concatenation is ``vae.decode`` of the whole latent video, bit for bit, and with a
    warm-up of preceding frames the frames after it."""
    from video_infinity.families.wan.vae import stream_wan_window

    vae = _small_vae()
    latents = torch.randn(1, vae.config.z_dim, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = vae.decode(latents).sample
        parts = list(stream_wan_window(vae, latents, 0))
        assert [p.shape[2] for p in parts] == [1, 4, 4, 4, 4, 4]
        assert torch.equal(torch.cat(parts, dim=2), whole)
        warmed = list(stream_wan_window(vae, latents, 2))
        assert len(warmed) == 4 and torch.equal(torch.cat(warmed, dim=2), whole[:, :, 5:])
