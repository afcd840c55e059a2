"""Wan image-to-video: diffusers' ``WanImageToVideoPipeline`` in its four modes through the engine.

First-last-frame and Wan2.2 TI2V run the whole conformance suite (``families.WAN_FLF``,
``families.WAN_TI2V``: parity with diffusers, worlds 1-4 bit for bit under four BLAS settings, loops
through the image, checkpoints resumed on another world size). Here: the other two modes' parity
(Wan2.1 I2V with CLIP, Wan2.2 A14B I2V with two experts and no CLIP), image inputs in every form,
continuation (``video=``), the refusals, CLIP on rank 0 only and a band window on 3 ranks through
``from_pretrained``, and the command line.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cli_utils import ok, one_line_error, run_cli
from families import sample_image
from harness import run_distributed
from tiny_models import build_tiny_wan_i2v_folder, build_tiny_wan_i2v_pipeline
from video_infinity import ClipContext, VideoInfinityPipeline
from video_infinity.families.wan.vae import latent_frame_count, normalize_wan_latents
from video_infinity.video_io import read_video

WHOLE_WINDOW = {"attn": {"padding": 1000, "top_k": 0, "local_phase": None, "global_phase": None}, "block_tokens": 2}
BAND = {"attn": {"padding": 1, "top_k": 1, "token_num_scale": True}, "block_tokens": 12}
PARITY = dict(num_frames=17, height=16, width=16, num_inference_steps=2, guidance_scale=5.0)
SIZE = dict(height=32, width=48)


def _noise(pipe: VideoInfinityPipeline, num_frames: int, height: int, width: int, seed: int = 7) -> torch.Tensor:
    channels, h, w = pipe.family.latent_shape(height, width)
    return torch.randn(1, channels, latent_frame_count(num_frames), h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v")
    return {mode: build_tiny_wan_i2v_folder(root / mode, mode) for mode in ("i2v", "a14b", "ti2v")}


# ----------------------------------------------------------------------------------- parity
@pytest.mark.unit
@pytest.mark.parametrize("mode", ["i2v", "a14b"])
def test_whole_window_equals_diffusers_image_to_video(mode):
    reference = build_tiny_wan_i2v_pipeline(mode)  # built in memory, as a user's from_pipe gets it
    reference.set_progress_bar_config(disable=True)
    if mode == "a14b":  # 2 steps at t = 999 and 750: a boundary at 0.8 gives each expert one
        reference.register_to_config(boundary_ratio=0.8)
    pipe = VideoInfinityPipeline.from_pipe(reference, engine=WHOLE_WINDOW)
    images = dict(image=sample_image(1), last_image=sample_image(2)) if mode == "a14b" else dict(image=sample_image(1))
    noise = _noise(pipe, **{k: PARITY[k] for k in ("num_frames", "height", "width")})
    theirs = reference(prompt="a cat runs on the beach", latents=noise.clone(), output_type="np", **images,
                       **PARITY).frames[0]
    ours = pipe("a cat runs on the beach", latents=noise, output_type="np", progress=False, **images, **PARITY).frames[0]
    assert ours.shape == theirs.shape == (17, 16, 16, 3) and ours.std() > 0.01
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # The image matters: another start image gives another video.
    other = pipe("a cat runs on the beach", latents=noise, output_type="np", progress=False,
                 **{**images, "image": sample_image(5)}, **PARITY).frames[0]
    assert np.abs(other - ours).max() > 1e-2


@pytest.mark.unit
def test_an_image_as_path_array_or_tensor_conditions_as_the_pil_image(tmp_path):
    reference = build_tiny_wan_i2v_pipeline("i2v")
    pipe = VideoInfinityPipeline.from_pipe(reference, engine=WHOLE_WINDOW)
    image = sample_image(1)
    image.save(tmp_path / "first.png")
    ctx = ClipContext(total_frames=5)
    conditions = {}
    for name, value in {"pil": image, "path": tmp_path / "first.png", "text": str(tmp_path / "first.png"),
                        "array": np.asarray(image)}.items():
        request = pipe.check_inputs("a cat", num_frames=17, guidance_scale=1.0, image=value, **SIZE)
        conditions[name] = pipe.conditioning(request, ctx).extra
    for name, extra in conditions.items():
        torch.testing.assert_close(extra["condition"], conditions["pil"]["condition"], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(extra["image_embeds"], conditions["pil"]["image_embeds"], atol=0, rtol=0, msg=name)
    # the condition: a mask of 4 channels (1 on the first video frame, repeated 4x for latent frame 0)
    condition = conditions["pil"]["condition"]
    assert condition.shape == (1, 4 + 4, 5, 4, 6)
    assert torch.equal(condition[:, :4, 0], torch.ones_like(condition[:, :4, 0]))
    assert not condition[:, :4, 1:].any()
    # a [0, 1] tensor (diffusers' convention for tensors) as the same picture (of the video's size:
    # diffusers resizes tensors and PIL images with different filters)
    image = sample_image(4, 48, 32)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    found = [pipe.conditioning(pipe.check_inputs("a cat", num_frames=17, guidance_scale=1.0, image=value, **SIZE),
                               ctx).extra["condition"] for value in (image, tensor)]
    torch.testing.assert_close(found[1], found[0], atol=1e-5, rtol=0)


@pytest.mark.unit
def test_a_ti2v_wan_pipeline_folder_given_an_image_is_the_image_to_video_pipeline(tmp_path):
    # Wan2.2 TI2V ships as a WanPipeline with expand_timesteps: given an image it runs the image mode.
    from diffusers import WanPipeline

    i2v = build_tiny_wan_i2v_pipeline("ti2v")
    WanPipeline(tokenizer=i2v.tokenizer, text_encoder=i2v.text_encoder, transformer=i2v.transformer, vae=i2v.vae,
                scheduler=i2v.scheduler, expand_timesteps=True).save_pretrained(tmp_path / "ti2v")
    call = dict(num_frames=9, num_inference_steps=2, guidance_scale=3.0, seed=2, output_type="latent", progress=False,
                image=sample_image(1), **SIZE)
    folder = VideoInfinityPipeline.from_pretrained(tmp_path / "ti2v", engine=BAND, device="cpu")
    assert folder.family.image_mode == "first_frame"
    ours = folder("a cat runs", **call).frames[0]
    theirs = VideoInfinityPipeline.from_pipe(i2v, engine=BAND)("a cat runs", **call).frames[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # loaded from files vs in memory
    text_only = folder("a cat runs", **{**call, "image": None}).frames[0]
    assert (text_only - ours).abs().max() > 0.1


@pytest.mark.unit
def test_diffusers_model_cpu_offload_composes_with_the_engine():
    """``enable_model_cpu_offload`` (accelerate's hooks moving each model to the execution device and
    back) around the engine's hooks: the same video, and the offload hooks stay once the engine's are
    removed. Run with ``device="cpu"`` here (no GPU): the hooks run, the moves are no-ops."""
    reference = build_tiny_wan_i2v_pipeline("i2v")
    call = dict(num_frames=9, num_inference_steps=2, guidance_scale=3.0, seed=2, output_type="latent", progress=False,
                image=sample_image(1), **SIZE)
    plain = VideoInfinityPipeline.from_pipe(reference, engine=BAND)("a cat runs", **call).frames[0]
    reference.enable_model_cpu_offload(device="cpu")
    offloaded = VideoInfinityPipeline.from_pipe(reference, engine=BAND)("a cat runs", **call).frames[0]
    assert torch.equal(offloaded, plain)
    assert type(reference.transformer._hf_hook).__name__ == "CpuOffload"
    assert not reference.transformer._diffusers_hook.hooks  # the engine's hooks are gone after the call


# ----------------------------------------------------------------------------------- continuation
@pytest.mark.unit
def test_continuation_conditions_the_given_frames(monkeypatch):
    # I2V models: the mask covers the given video frames and their latents are encoded with zeros after.
    pipe = VideoInfinityPipeline.from_pipe(build_tiny_wan_i2v_pipeline("i2v"), engine=WHOLE_WINDOW)
    clip = np.stack([np.asarray(sample_image(10 + i, 48, 32)) for i in range(6)])  # 6 frames of an earlier video
    request = pipe.check_inputs("a cat", num_frames=17, guidance_scale=1.0, video=clip, **SIZE)
    condition = pipe.conditioning(request, ClipContext(total_frames=5)).extra["condition"]
    mask = condition[0, :4, :, 0, 0]  # (4 channels, 5 latent frames): video frame 4i - 3 + c of latent frame i
    expected = torch.zeros(4, 5)
    expected[:, 0] = 1  # frame 0
    expected[:, 1] = 1  # frames 1-4
    expected[0, 2] = 1  # frame 5
    assert torch.equal(mask, expected)
    from diffusers.video_processor import VideoProcessor  # the pipeline's preprocessing

    frames = [sample_image(10 + i, 48, 32) for i in range(6)]  # a uint8 array's frames are these images
    given = VideoProcessor(vae_scale_factor=8).preprocess_video(frames, height=32, width=48)
    whole = torch.cat([given, given.new_zeros(1, 3, 11, 32, 48)], dim=2)
    with torch.no_grad():
        encoded = normalize_wan_latents(pipe.family.vae, pipe.family.vae.encode(whole).latent_dist.mode())
    torch.testing.assert_close(condition[:, 4:], encoded, atol=1e-5, rtol=0)

    # TI2V: whole latent frames of the given video replace the first latent frames (1 + 4k frames)
    ti2v = VideoInfinityPipeline.from_pipe(build_tiny_wan_i2v_pipeline("ti2v"), engine=WHOLE_WINDOW)
    with pytest.raises(ValueError, match=r"^video: .* give 1 \+ 4k frames \(got 6; e.g. its last 5 or 9\)$"):
        ti2v.check_inputs("a cat", num_frames=17, guidance_scale=1.0, video=clip, **SIZE)
    import video_infinity.pipeline

    reads = []  # the call checks and conditions with one read of the video (a file would be decoded once)
    read = video_infinity.pipeline.load_video
    monkeypatch.setattr(video_infinity.pipeline, "load_video", lambda *a: reads.append(a) or read(*a))
    latents = ti2v("a cat", num_frames=17, num_inference_steps=2, guidance_scale=1.0, video=clip[:5], seed=1,
                   output_type="latent", progress=False, **SIZE).frames[0]
    assert len(reads) == 1
    with torch.no_grad():
        given_latents = normalize_wan_latents(ti2v.family.vae, ti2v.family.vae.encode(given[:, :, :5]).latent_dist.mode())
    torch.testing.assert_close(latents[None, :, :2], given_latents, atol=1e-5, rtol=0)
    assert (latents[:, 2:] - given_latents[0, :, 1:2]).abs().max() > 0.1  # the rest is generated


# ----------------------------------------------------------------------------------- refusals
@pytest.mark.unit
def test_images_a_model_cannot_take_are_refused_in_one_line(tmp_path):
    i2v = VideoInfinityPipeline.from_pipe(build_tiny_wan_i2v_pipeline("i2v"))
    ti2v = VideoInfinityPipeline.from_pipe(build_tiny_wan_i2v_pipeline("ti2v"))
    call = dict(num_frames=17, guidance_scale=1.0, **SIZE)
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (i2v, {}, r"^image: .* is an image-to-video model .*: give image \(the first frame\) or video"),
        (i2v, {"image": sample_image(1), "last_image": sample_image(2)},
         r"^last_image: .* embeds one image \(no position embedding for two: not a first-last-frame model\)"),
        (ti2v, {"image": sample_image(1), "last_image": sample_image(2)},
         r"^last_image: .* conditions on its first frames only"),
        (i2v, {"image": tmp_path / "missing.png"}, r"^image: no file at '.*missing.png' \(give the path of an image file\)$"),
        (i2v, {"image": tmp_path / "notes.txt"}, r"^image: cannot read '.*notes.txt' as an image \(UnidentifiedImageError"),
        (i2v, {"image": 3}, r"^image: must be a path, a PIL image, an array, a tensor; got int$"),
        (i2v, {"last_image": sample_image(2)}, r"^last_image: needs image \(the first frame\) too$"),
        (i2v, {"image": sample_image(1), "video": [sample_image(2)]}, r"^video: the given frames start the video"),
    ]
    for pipe, images, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.check_inputs("a cat", **call, **images)
    # TI2V takes text alone too (then it is text-to-video)
    ti2v.check_inputs("a cat", **call)


@pytest.mark.unit
def test_a_pipeline_whose_transformer_channels_fit_no_image_mode_is_refused_in_one_line():
    """``from_pipe`` judges a loaded pipeline by the rule a folder's config files are judged by."""
    reference = build_tiny_wan_i2v_pipeline("a14b")
    denoiser = reference.transformer if reference.transformer is not None else reference.transformer_2
    outs = denoiser.config.out_channels
    denoiser.register_to_config(in_channels=outs + 1)
    with pytest.raises(ValueError, match=rf"^WanImageToVideoPipeline: transformer in_channels {outs + 1} is not "
                                         rf"out_channels {outs} \+ 4 mask channels \+ {outs} image latent channels$"):
        VideoInfinityPipeline.from_pipe(reference)
    denoiser.register_to_config(in_channels=outs)  # fits text-to-video only: a folder so is refused, and so is this
    assert not reference.config.expand_timesteps
    with pytest.raises(ValueError, match=r"^WanImageToVideoPipeline: image-to-video, but its transformer takes no "
                                         r"image \(in_channels = out_channels, no expand_timesteps\)$"):
        VideoInfinityPipeline.from_pipe(reference)


# ----------------------------------------------------------------------------------- ranks
def _band_worker(rank: int, world_size: int, folders: dict) -> dict:
    """Each mode on one rank (a subgroup of rank 0) and on all three."""
    import torch.distributed as dist

    groups = {1: dist.new_group([0]), 3: None}
    results = {}
    for mode, folder in folders.items():
        images = {"image": sample_image(1)} if mode == "i2v" else {
            "image": sample_image(1), "last_image": sample_image(2)} if mode == "a14b" else {
            "video": [sample_image(20 + i, 48, 32) for i in range(5)]}
        for world in (1, 3):
            if rank >= world:
                continue
            ctx = ClipContext(rank=rank, world_size=world, total_frames=latent_frame_count(25), group=groups[world])
            pipe = VideoInfinityPipeline.from_pretrained(folder, engine=BAND, device="cpu")
            latents = pipe(["a cat runs on the beach", "a dog jumps in snow"], num_frames=25, num_inference_steps=2,
                           guidance_scale=4.0, seed=3, output_type="latent", context=ctx, progress=False, **images,
                           **SIZE).frames
            results[(mode, world)] = {"latents": latents, "clip_loaded": pipe.family.image_encoder is not None,
                                      "text_loaded": pipe.family.text_pipeline is not None}
        dist.barrier()
    return results


@pytest.mark.distributed
def test_band_window_on_three_ranks_equals_one_rank_and_clip_runs_on_rank_zero(folders, tmp_path):
    ranks = run_distributed(_band_worker, 3, folders, tmp_dir=tmp_path)
    for mode in ("i2v", "a14b", "ti2v"):  # Wan2.1 I2V (CLIP), Wan2.2 A14B (first and last), TI2V continuing 5 frames
        one, three = ranks[0][(mode, 1)], [r[(mode, 3)] for r in ranks]
        assert one["latents"].shape[2] == 7 and one["latents"].abs().max() > 0.1
        assert torch.equal(three[0]["latents"], one["latents"]), mode
        assert [r["text_loaded"] for r in three] == [True, False, False]  # rank 0 encodes, the others receive
        if mode == "i2v":
            assert [r["clip_loaded"] for r in three] == [True, False, False]


# ----------------------------------------------------------------------------------- command line
@pytest.mark.e2e
def test_cli_image_to_video_on_two_ranks_and_its_refusals(folders, tmp_path, offline_env):
    sample_image(1, 48, 32).save(tmp_path / "first.png")  # the video's aspect ratio: no resize warning
    (tmp_path / "notes.txt").write_text("not an image")
    base = {"dtype": "float32", "devices": ["cpu", "cpu"], "seed": 3, "base_path": str(tmp_path / "out"),
            "model": str(folders["i2v"]), "plugin_configs": "wan",
            "pipe_configs": {"prompts": ["a cat runs on the beach"], "steps": 1, "guidance_scale": 3.0,
                             "total_frames": 9, "export_fps": 8, "file_name": "i2v", "image": str(tmp_path / "first.png"),
                             **SIZE}}

    def config(**changes) -> str:
        data = json.loads(json.dumps(base))
        data["pipe_configs"].update(changes)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(data))
        return path

    refusals = [
        ({"image": None}, r"pipe_configs\.image: .* is an image-to-video model"),
        ({"image": str(tmp_path / "notes.txt")}, r"pipe_configs\.image: cannot read '.*notes.txt' as an image"),
        ({"image": str(tmp_path / "gone.png")}, r"pipe_configs\.image: no file at"),
        ({"last_image": str(tmp_path / "first.png")}, r"pipe_configs\.last_image: .* not a first-last-frame model"),
    ]
    for changes, message in refusals:
        line = one_line_error(run_cli(config(**changes), offline_env), 2)
        assert re.search(message, line), line
        assert not (tmp_path / "out").exists()
    ok(run_cli(config(), offline_env))
    frames, fps = read_video(tmp_path / "out" / "i2v.mp4")
    assert frames.shape == (9, 32, 48, 3) and fps == 8
    sidecar = json.loads((tmp_path / "out" / "i2v.json").read_text())
    assert sidecar["request"]["image"].startswith(str(tmp_path / "first.png") + " (sha256 ")
