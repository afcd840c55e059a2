"""The Wan demo model's training script at toy size: every stage runs, the transformer resumes, the
export is a WanPipeline folder the package loads, and training sees the prompts and latents exactly as
the pipeline will give them at sampling time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from video_infinity.demo import data, train_wan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "video_infinity.demo.train", "--family", "wan", "--threads", "1",
                           "--eval-minutes", "0", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_train_wan")
    done = _train("--out", str(out), "--vae-max-steps", "2", "--vae-scale-clips", "2", "--clips-per-class", "1",
                  "--max-steps", "3", "--batch", "2", "--export", str(out / "export"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_stage_writes_its_output_and_resumes(run):
    clips = torch.load(run / "latents.pt")
    latent = data.SIZE // 4
    assert clips["latents"].shape == (len(data.all_classes()), train_wan.LATENT_CHANNELS, 9, latent, latent)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3
    done = _train("--out", str(run), "--stage", "transformer", "--resume", "--max-steps", "5", "--batch", "2",
                  "--counterfactual", "1", "--counterfactual-sigma", "0", "--window-start", "first")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "moving 2 px a frame, windows (5, 9) starting at the first latent frame" in done.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 5
    with pytest.raises(SystemExit, match="exists: pass --resume"):  # in-process: no third interpreter start
        train_wan.train_transformer(run, minutes=1, seed=0, resume=False, max_steps=6)


def test_training_continues_from_an_exported_model(run, tmp_path):
    """The shipped weights are a starting point: --init FOLDER --vae-init FOLDER/vae (0 VAE minutes)
    continues the transformer's steps and keeps the VAE as it is."""
    export = run / "export"
    assert json.loads((export / "training.json").read_text())["step"] == 3
    (tmp_path / "more").mkdir()
    shutil.copy(run / "latents.pt", tmp_path / "more")  # the same VAE's clips: the latents stage skips them
    done = _train("--out", str(tmp_path / "more"), "--init", str(export), "--vae-init", str(export / "vae"),
                  "--vae-minutes", "0", "--vae-scale-clips", "2", "--clips-per-class", "1", "--max-steps", "4",
                  "--batch", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=False)["step"] == 4
    before = json.loads((export / "vae" / "config.json").read_text())
    after = json.loads((tmp_path / "more" / "vae" / "config.json").read_text())
    assert after["latents_std"] == before["latents_std"]


def test_a_decoder_only_fine_tune_keeps_the_encoder_and_its_latent_statistics(run, tmp_path):
    """--vae-decoder-only (with --vae-init): the decoder learns, the encoder and the latents' mean and
    std stay exactly as they were, so latents encoded before (and a transformer trained on them) stay
    valid. In-process: two steps on 5-frame clips."""
    from diffusers import AutoencoderKLWan

    init = run / "export" / "vae"
    train_wan.train_vae(tmp_path, minutes=5, seed=3, batch=1, frames=5, scale_clips=2, max_steps=2, init=init,
                        decoder_only=True)
    before, after = (AutoencoderKLWan.from_pretrained(p) for p in (init, tmp_path / "vae"))
    encoder = [n for n, _ in before.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    decoder = [n for n, _ in before.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    assert encoder and all(torch.equal(old[n], new[n]) for n in encoder)
    assert any(not torch.equal(old[n], new[n]) for n in decoder)
    for key in ("latents_mean", "latents_std"):
        assert after.config[key] == before.config[key]
    with pytest.raises(ValueError, match="decoder_only: needs init"):
        train_wan.train_vae(tmp_path / "fresh", minutes=1, seed=0, max_steps=1, decoder_only=True)
    with pytest.raises(SystemExit) as refused:  # the command line: one line, before any training
        train_wan.main(["--out", str(tmp_path / "cli"), "--vae-decoder-only"])
    assert refused.value.code == 2 and not (tmp_path / "cli").exists()


def test_training_latents_are_the_pipelines_scale(run):
    """The stored clips, denormalised as the pipeline does before decoding, are the VAE's encodings."""
    from diffusers import AutoencoderKLWan

    from video_infinity.families.wan.vae import denormalize_wan_latents

    vae = AutoencoderKLWan.from_pretrained(run / "vae").eval()
    clips = torch.load(run / "latents.pt")
    colour, shape, direction = clips["classes"][int(clips["labels"][0])]
    spec = train_wan.random_spec(np.random.default_rng(2), [(colour, shape, direction)])  # encode_clips' first draw
    assert train_wan.clip_speed(clips) == spec.speed == train_wan.SPEED
    with torch.no_grad():
        encoded = vae.encode(train_wan.video_tensor(data.render(spec, 33, trail=data.TRAIL)[None])).latent_dist.mode()
    restored = denormalize_wan_latents(vae, clips["latents"][:1].float())
    assert torch.allclose(restored, encoded, atol=5e-3 * encoded.abs().max().item())  # float16 storage
    with pytest.raises(SystemExit, match=r"moving 2 px a frame, not --speed 4: .* pass --speed 2"):
        train_wan.encode_clips(run, 1, seed=0, speed=4.0)  # stored clips at another speed are never mixed in


@pytest.mark.parametrize("speed", [1.0, 2.0, 3.0])
def test_training_clips_move_at_the_chosen_speed(speed):
    """The Wan demo's shapes move ``speed`` px a frame, from the same start as data's draw."""
    from video_infinity.demo.probe import analyse

    spec = train_wan.random_spec(np.random.default_rng(3), [("blue", "square", "up")], speed)
    drawn = data.random_spec(np.random.default_rng(3), [("blue", "square", "up")])
    assert (spec.x0, spec.y0, spec.direction) == (drawn.x0, drawn.y0, drawn.direction)
    report = analyse(data.render(spec, 17, trail=data.TRAIL))
    assert report.direction == "up" and report.velocity[1] == pytest.approx(-speed, abs=0.1)


def test_training_prompt_embeddings_are_the_pipelines(run):
    """Training pads prompts as the engine's Wan family encodes them at sampling time (keys of the zero
    padding take part in cross-attention, so a different length would be another model)."""
    from diffusers import WanPipeline

    from video_infinity.families.wan.family import WanFamily

    parts = train_wan.components(run, train_wan.new_transformer(0), seed=0)
    prompts = ["a red circle moving right", ""]
    family = WanFamily.from_pipe(WanPipeline(**parts))
    expected = family.encode_prompts(prompts)
    got = train_wan.encode_prompts(parts["tokenizer"], parts["text_encoder"], prompts)
    assert got.shape == expected.shape == (2, train_wan.MAX_SEQUENCE_LENGTH, train_wan.TEXT_DIM)
    assert torch.equal(got, expected)


def test_export_loads_through_the_package_and_keeps_the_frozen_text_encoder(run):
    from video_infinity import VideoInfinityPipeline

    pipe = VideoInfinityPipeline.from_pretrained(str(run / "export"))
    family = pipe.family
    assert family.name == "wan" and family.vae.config.scale_factor_spatial == 4
    encoder = family.text_pipeline.text_encoder if family.text_pipeline is not None else None
    if encoder is None:
        family.encode_prompts(["a"])
        encoder = family.text_pipeline.text_encoder
    fresh = train_wan.new_text_encoder(train_wan.new_tokenizer(), seed=0)
    for (name, exported), initial in zip(encoder.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(exported, initial), name
    video = pipe("a red circle moving right", num_frames=9, height=data.SIZE, width=data.SIZE, num_inference_steps=2,
                 seed=0, progress=False).frames[0]
    assert video.shape == (9, data.SIZE, data.SIZE, 3) and np.isfinite(video).all()


def test_flow_matching_noise_levels_follow_the_schedulers_shift():
    from video_infinity.schedulers import make_scheduler

    u = torch.linspace(0, 1, 11)
    sigma = train_wan.shifted_sigmas(u)
    assert sigma[0] == 0 and sigma[-1] == 1 and bool((sigma.diff() > 0).all()) and bool((sigma >= u).all())
    # Sampling's steps are the same map of an evenly spaced grid (UniPC with use_flow_sigmas, flow_shift).
    scheduler = make_scheduler("model", dict(train_wan.SCHEDULER_CONFIG))
    scheduler.set_timesteps(10)
    steps = torch.as_tensor(scheduler.sigmas[:10], dtype=torch.float64)
    assert torch.allclose(train_wan.shifted_sigmas(torch.linspace(1, 0.1, 10, dtype=torch.float64)), steps, atol=3e-3)


def test_learning_rate_warms_up_holds_and_decays_to_zero_over_the_runs_last_minutes():
    factor = train_wan.lr_factor
    assert factor(0, 0.0, 100, 30) == pytest.approx(1 / 200) and factor(199, 60.0, 100, 30) == 1.0
    assert factor(5000, 70 * 60, 100, 30) == 1.0  # the decay begins 30 min before the end
    assert factor(5000, 85 * 60, 100, 30) == pytest.approx(0.5)
    assert factor(9000, 100 * 60, 100, 30) == 0.0 and factor(9000, 101 * 60, 100, 30) == 0.0
    assert factor(9000, 100 * 60, 100, 0) == 1.0  # no decay asked: constant to the end
    assert factor(10, 99 * 60, 100, 30) == pytest.approx(1 / 30)  # the smaller of warm-up (11/200) and decay


def test_clip_starts_replay_the_encoders_draws(run):
    stored = torch.load(run / "latents.pt")["starts"]
    assert torch.equal(train_wan.clip_starts(0, len(stored)), stored)


@pytest.mark.parametrize("frame", [0, 5, 29])
def test_a_counterfactual_clip_rolled_by_meeting_roll_meets_the_object(frame):
    """The target clip, rolled by whole latent pixels, has its object where the sample's is in ``frame``."""
    from video_infinity.demo.probe import track

    rng = np.random.default_rng(frame)
    one = data.random_spec(rng, [("red", "circle", "right")])
    other = data.random_spec(rng, [("red", "circle", "up")])
    velocity = {name: torch.tensor(v) * data.SPEED for name, v in data.DIRECTIONS.items()}
    dy, dx = train_wan.meeting_roll(frame, torch.tensor([one.x0, one.y0]), velocity["right"],
                                    torch.tensor([other.x0, other.y0]), velocity["up"], latent_pixel=4.0)
    seen = data.render(one, 1, frame)
    moved = np.roll(data.render(other, 1, frame), (4 * dy, 4 * dx), axis=(1, 2))
    (x1, y1), (x2, y2) = track(seen)[0], track(moved)[0]
    gap = [(a - b + data.SIZE / 2) % data.SIZE - data.SIZE / 2 for a, b in ((x1, x2), (y1, y2))]
    assert max(abs(g) for g in gap) <= 2.5  # rounded to whole latent pixels of 4 (a pixel = 4), tracker error aside


def test_trimmed_padding_attends_as_the_pipelines_512_tokens():
    """Training keeps 16 text tokens and weighs the padding it drops into the cross-attention's logits:
    the transformer's output equals the one on the pipeline's 512-token embeddings (float rounding),
    for captions and the empty prompt in one batch; without the weight it does not."""
    tokenizer = train_wan.new_tokenizer()
    encoder = train_wan.new_text_encoder(tokenizer, seed=0)
    prompts = [data.caption("red", "circle", "right"), "", data.caption("blue", "triangle", "up")]
    full = train_wan.encode_prompts(tokenizer, encoder, prompts)
    assert full.shape[1] == train_wan.MAX_SEQUENCE_LENGTH
    trimmed, bias = train_wan.trim_padding(full, train_wan.token_counts(tokenizer, prompts))
    assert trimmed.shape == (3, train_wan.TRAIN_TEXT_TOKENS, train_wan.TEXT_DIM)
    assert bias[1, 0, 0, 0] == 0 and bias[1, 0, 0, 1] == pytest.approx(np.log(511 / 15))
    transformer = train_wan.new_transformer(seed=1).eval()
    torch.manual_seed(2)
    for block in transformer.blocks:  # away from the initialisation's zeros, so that every path counts
        for p in block.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, train_wan.LATENT_CHANNELS, 5, 16, 16)
    t = torch.tensor([900.0, 400.0, 50.0])
    with torch.no_grad():
        expected = transformer(x, timestep=t, encoder_hidden_states=full, return_dict=False)[0]
        unweighted = transformer(x, timestep=t, encoder_hidden_states=trimmed, return_dict=False)[0]
        weights = train_wan.PaddingWeight().install(transformer)
        weights.bias = bias
        got = transformer(x, timestep=t, encoder_hidden_states=trimmed, return_dict=False)[0]
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert (unweighted - expected).abs().max() > 1e-3 * scale
    with pytest.raises(ValueError, match="leaves no padding"):
        train_wan.trim_padding(full, [16, 1, 7])
