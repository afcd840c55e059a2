"""The Python API: VideoInfinityPipeline's arguments, outputs and checks. Parity with diffusers, ranks and
loops: test_conformance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from video_infinity import EngineConfig, VideoInfinityPipeline

FRAMES, HEIGHT, WIDTH = 6, 32, 40
SMALL = {"attn": {"padding": 2, "top_k": 2}}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return VideoInfinityPipeline.from_pretrained(tiny_model, engine=SMALL, device="cpu")


def _latents(frames: int = FRAMES, seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 4, frames, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.unit
def test_prompt_dict_blends_linearly_between_keyframes(pipe):
    from video_infinity.context import ClipContext

    request = pipe.check_inputs({0: "a red circle moving right", 4: "a blue square moving up"}, num_frames=7,
                                height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=1.0)
    per_frame = pipe.conditioning(request, ClipContext(total_frames=7)).prompt_embeds[0]
    red, blue = pipe.family.encode_prompts(["a red circle moving right", "a blue square moving up"])
    for frame, weight in enumerate([0, 0.25, 0.5, 0.75, 1, 1, 1]):
        torch.testing.assert_close(per_frame[frame], (1 - weight) * red + weight * blue, atol=1e-6, rtol=0)


@pytest.mark.unit
def test_output_types_and_tuple_return(pipe):
    common = dict(num_frames=3, height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=1.0, seed=2,
                  progress=False)
    video = pipe("a red circle", output_type="np", **common).frames[0]
    tensor = pipe("a red circle", output_type="pt", **common).frames[0]
    images = pipe("a red circle", output_type="pil", **common).frames[0]
    (latents,) = pipe("a red circle", output_type="latent", return_dict=False, **common)
    assert video.shape == (3, HEIGHT, WIDTH, 3) and 0 <= video.min() and video.max() <= 1
    torch.testing.assert_close(tensor.permute(0, 2, 3, 1).numpy(), video, atol=0, rtol=0)
    assert len(images) == 3 and images[0].size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(images[1]), (video[1] * 255).round().astype(np.uint8))
    assert latents.shape == (1, 4, 3, HEIGHT // 8, WIDTH // 8)


@pytest.mark.unit
def test_callback_on_step_end_sees_each_step_and_can_stop(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape)))
        if step == 1:
            p._interrupt = True
        return {"latents": kwargs["latents"] * 0} if step == 1 else {}

    common = dict(num_frames=3, height=HEIGHT, width=WIDTH, guidance_scale=1.0, seed=2, progress=False,
                  scheduler="ddim", output_type="latent")
    latents = pipe("a red circle", num_inference_steps=4, callback_on_step_end=callback, **common).frames
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] > seen[1][1]
    assert seen[0][2] == (1, 4, 3, HEIGHT // 8, WIDTH // 8)
    assert torch.count_nonzero(latents) == 0  # the latents the callback returned were kept, and it stopped there


@pytest.mark.unit
def test_same_seed_same_video_and_seed_changes_it(pipe):
    common = dict(num_frames=3, height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=3.0, progress=False,
                  output_type="latent")
    a = pipe("a red circle", seed=4, **common).frames
    b = pipe("a red circle", seed=4, **common).frames
    c = pipe("a red circle", seed=5, **common).frames
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.unit
@pytest.mark.parametrize("change, words", [
    ({"num_frames": 0}, "num_frames"),
    ({"height": 30}, "height: must be a positive multiple of 8"),
    ({"width": 12}, "width"),
    ({"prompt": {1: "late start"}}, "frame 0"),
    ({"prompt": {0: "a", 9: "b"}}, "[0, 6)"),
    ({"output_type": "gif"}, "output_type"),
    ({"scheduler": "euler"}, "scheduler"),
    ({"num_frames": 1, "context_world": 2}, "ranks"),
])
def test_bad_arguments_raise_one_line_value_errors_before_model_work(pipe, change, words, monkeypatch):
    from video_infinity.context import ClipContext

    def no_model_work(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(pipe.family, "predict_noise", no_model_work)
    monkeypatch.setattr(pipe.family, "encode_prompts", no_model_work)
    arguments = dict(prompt="a red circle", num_frames=6, height=HEIGHT, width=WIDTH, num_inference_steps=1,
                     guidance_scale=1.0, progress=False)
    world = change.pop("context_world", None)
    arguments.update(change)
    if world is not None:
        arguments["context"] = ClipContext(rank=0, world_size=world, total_frames=2)
    with pytest.raises(ValueError) as error:
        pipe(arguments.pop("prompt"), **arguments)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.unit
def test_engine_accepts_the_original_plugin_configs_dict(tiny_model):
    original = {"attn": {"padding": 24, "top_k": 16, "local_phase": {"t": 800, "local_biase": 10, "global_biase": 0},
                         "global_phase": {"t": 800, "local_biase": 0, "global_biase": 10}, "token_num_scale": True,
                         "dynamic_scale": True}, "conv_layer": {}}
    pipe = VideoInfinityPipeline.from_pretrained(tiny_model, engine=original, device="cpu")
    assert pipe.engine == EngineConfig.model_validate(original)
    assert pipe.engine.attn.phase_biases(900) == (0.0, 10.0) and pipe.engine.attn.phase_biases(100) == (10.0, 0.0)


@pytest.mark.unit
def test_loop_argument_is_for_the_call_and_needs_the_conv_halos(pipe):
    # (What a loop does: test_conformance's roll-equivariance.)
    common = dict(num_frames=5, height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=3.0, progress=False,
                  output_type="latent", scheduler="ddim")
    latents = _latents(5)
    ring_pipe = VideoInfinityPipeline(pipe.family, engine={"attn": {"padding": 1, "top_k": 0}})
    ring = ring_pipe("a red circle", latents=latents, loop=True, **common).frames[0]
    plain = ring_pipe("a red circle", latents=latents, **common).frames[0]
    assert (plain[:, 0] - ring[:, 0]).abs().max() > 1e-4  # the call's loop took effect
    assert ring_pipe.engine.loop is False  # and does not stick
    with pytest.raises(ValueError, match="conv_layer"):
        VideoInfinityPipeline(pipe.family, engine={"conv_layer": {"enabled": False}})("a", latents=latents, loop=True,
                                                                                        **common)
