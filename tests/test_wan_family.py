"""Wan family pieces: frame rule, folder recognition, rank-0 text encoding, the parallel VAE decode
(equal to vae.decode of the whole latent video), and generate_wan end to end on a tiny folder."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline

from engine_utils import run_distributed
from video_infinity.context import ClipContext
from video_infinity.families.wan import (
    broadcast_from_rank0,
    check_wan_size,
    decode_wan_clip,
    decode_wan_window,
    denormalize_wan_latents,
    generate_wan,
    is_wan_folder,
    latent_frame_count,
    load_wan_scheduler,
    video_frame_count,
    video_frames_of,
    wan_decoder_receptive_field,
)
from video_infinity.noise import frame_noise
from wan_pipeline_utils import build_tiny_wan_folder


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
    check_wan_size(480, 832)
    with pytest.raises(ValueError, match=r"width: .*multiple of 16.*use 832"):
        check_wan_size(480, 840)


@pytest.mark.unit
def test_tiny_folder_is_recognised_and_loads_in_diffusers(wan_folder, tmp_path):
    assert is_wan_folder(wan_folder)
    (tmp_path / "model_index.json").write_text('{"_class_name": "TextToVideoSDPipeline"}')
    assert not is_wan_folder(tmp_path)
    scheduler = load_wan_scheduler(wan_folder)
    assert type(scheduler).__name__ == "UniPCMultistepScheduler" and scheduler.config.flow_shift == 3.0
    assert load_wan_scheduler(wan_folder, flow_shift=5.0).config.flow_shift == 5.0
    pipe = WanPipeline.from_pretrained(wan_folder)
    assert pipe.transformer is not None and pipe.vae.config.scale_factor_temporal == 4


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
    # (One rank: generate_wan's tests decode through decode_wan_clip.) 3 ranks own latent frames
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
GENERATE = dict(num_frames=NUM_FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS, max_sequence_length=8, seed=4)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan_folder") / "pipe")


@pytest.fixture(scope="module")
def two_expert_folder(tmp_path_factory):
    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan_a14b") / "pipe", two_experts=True)


def _generate_worker(rank: int, world_size: int, folder: str, prompts: list[str], engine: dict) -> dict:
    ctx = ClipContext.from_process_group(total_frames=LATENT_FRAMES)
    clip = generate_wan(folder, prompts, ctx, engine_config=engine, **GENERATE)
    return {"latents": clip.latents, "video": clip.video}


BAND = {"attn": {"padding": 1, "top_k": 1}}


@pytest.mark.unit
def test_generate_with_a_whole_window_equals_diffusers_wan_pipeline(two_expert_folder):
    # Both experts (boundary_ratio 0.5 over 2 steps: one step each), WanPipeline given the same noise.
    ctx = ClipContext(total_frames=LATENT_FRAMES)
    clip = generate_wan(two_expert_folder, "a cat runs on the beach", ctx, engine_config={"attn": {"padding": 100, "top_k": 0}},
                        **GENERATE)
    noise = frame_noise(GENERATE["seed"], range(LATENT_FRAMES), (1, 4, 2, 2))
    pipe = WanPipeline.from_pretrained(two_expert_folder)
    expected = pipe("a cat runs on the beach", num_frames=NUM_FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    max_sequence_length=8, latents=noise, output_type="latent").frames
    torch.testing.assert_close(clip.latents, expected, atol=1e-5, rtol=0)
    assert clip.video.shape == (1, 3, NUM_FRAMES, SIZE, SIZE)
    with pytest.raises(ValueError, match="num_frames"):
        generate_wan(two_expert_folder, "a cat", ctx, **{**GENERATE, "num_frames": 16})


@pytest.mark.distributed
def test_two_ranks_give_the_same_latents_and_frames_as_one(wan_folder, tmp_path):
    prompts = ["a cat runs on the beach", "a dog jumps in snow"]  # multi-prompt: per latent frame
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        one = generate_wan(wan_folder, prompts, ClipContext(total_frames=LATENT_FRAMES), engine_config=BAND, **GENERATE)
    finally:
        torch.set_num_threads(threads)
    parts = run_distributed(_generate_worker, 2, str(wan_folder), prompts, BAND, tmp_dir=tmp_path)
    latents = torch.cat([p["latents"] for p in parts], dim=2)
    assert torch.equal(latents, one.latents), f"max diff {(latents - one.latents).abs().max():.3g}"
    video = torch.cat([p["video"] for p in parts], dim=2)
    assert video.shape == (1, 3, NUM_FRAMES, SIZE, SIZE)
    torch.testing.assert_close(video, one.video, atol=1e-5, rtol=0)
    # The second prompt matters (not a test that cannot fail).
    single_prompt = generate_wan(wan_folder, prompts[:1], ClipContext(total_frames=LATENT_FRAMES), engine_config=BAND,
                                 **GENERATE, decode=False)
    assert (single_prompt.latents - one.latents).abs().max() > 1e-3
