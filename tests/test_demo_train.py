"""The demo model's training script, end to end at toy size: every stage runs, checkpoints resume,
the export loads through the package's loading code, and mismatched runs are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from video_infinity.demo import data, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "video_infinity.demo.train", "--threads", "1", "--eval-minutes", "0",
                           *args], capture_output=True, text=True, timeout=300)


def _refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The refusal of ``train.main(args)`` in-process (no interpreter start): its one line."""
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main(["--threads", "1", "--eval-minutes", "0", *args])
    finally:  # main flushes denormals (for speed): the worker's later tests must not inherit that
        torch.set_flush_denormal(False)
    return stopped.value.code if isinstance(stopped.value.code, str) else capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_train")
    done = _train("--out", str(out), "--vae-minutes", "0.02", "--vae-scale-clips", "4", "--clips-per-class", "1",
                  "--max-steps", "3",
                  "--export", str(out / "export"))
    assert done.returncode == 0, done.stderr[-3000:]
    # Reversed trail clips would show the trail leading: no time-reversal augmentation with the trail.
    assert "time reversal off" in done.stderr
    return out


def test_every_stage_writes_its_output(run):
    clips = torch.load(run / "latents.pt")
    assert clips["latents"].shape == (len(data.all_classes()), 4, 16, data.SIZE // 4, data.SIZE // 4)
    assert [tuple(t) for t in clips["trail"]] == list(data.TRAIL)  # the default data has the motion trail
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["config"]["train_text_encoder"] is False
    assert (run / "loss.csv").exists() and (run / "vae" / "config.json").exists()


def test_export_loads_and_keeps_the_frozen_text_encoder(run):
    from video_infinity.families.unet3d.model import load_model

    components = load_model(str(run / "export"))
    fresh = train.new_text_encoder(train.load_tokenizer(run / "tokenizer"), seed=3)  # --seed 0, plus 3
    for (name, exported), initial in zip(components.text_encoder.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(exported, initial), name
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert any(not torch.equal(a, b) for a, b in zip(state["unet"].values(), train.new_unet(0).state_dict().values()))


def test_resume_continues_and_refuses_another_text_encoder_mode(run, capsys):
    done = _train("--out", str(run), "--stage", "unet", "--resume", "--max-steps", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 5
    common = ["--out", str(run), "--stage", "unet", "--resume", "--max-steps", "6"]
    assert "--text-encoder frozen" in _refused(capsys, *common, "--text-encoder", "trained")
    assert "another UNet configuration" in _refused(capsys, *common, "--text-at-every-level")
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 5  # neither refusal wrote anything


def test_export_builds_the_unet_the_checkpoint_was_trained_with(tmp_path, run):
    import shutil

    other = tmp_path / "wide"
    other.mkdir()
    for name in ("vae", "tokenizer", "latents.pt"):
        (shutil.copytree if (run / name).is_dir() else shutil.copy)(run / name, other / name)
    done = _train("--out", str(other), "--max-steps", "1", "--text-at-every-level",  # vae, latents: there
                  "--export", str(other / "export"))
    assert done.returncode == 0, done.stderr[-3000:]
    from video_infinity.families.unet3d.model import load_model

    unet = load_model(str(other / "export")).unet
    assert tuple(unet.config.down_block_types) == train.UNET_TEXT_AT_EVERY_LEVEL["down_block_types"]


def test_latents_of_other_data_are_refused(run, capsys):
    assert "another --trail" in _refused(capsys, "--out", str(run), "--stage", "latents", "--trail", "off")


def test_clip_groups_show_one_scene_moving_each_way(run):
    clips = torch.load(run / "latents.pt")
    classes, labels, partners = clips["classes"], clips["labels"], clips["partners"]
    assert partners.shape == (len(labels), len(data.DIRECTIONS))
    for i in range(len(labels)):
        members = [tuple(classes[int(labels[j])]) for j in partners[i]]
        assert [d for _c, _s, d in members] == list(data.DIRECTIONS)  # column k moves in direction k
        assert len({(c, s) for c, s, _d in members}) == 1  # one colour and shape per group
        own_direction = list(data.DIRECTIONS).index(classes[int(labels[i])][2])
        assert int(partners[i][own_direction]) == i  # a clip is its own partner in its own direction


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scene_group_starts_together_and_moves_each_way(seed):
    import numpy as np

    specs = data.scene_group(np.random.default_rng(seed), "red", "square")
    assert [s.direction for s in specs] == list(data.DIRECTIONS)
    start = np.array([s.centre(0) for s in specs])
    assert np.allclose(start, start[0])
    for spec in specs:  # three frames later each has moved 3 * SPEED its own way
        (x, y), (dx, dy) = spec.centre(3), data.DIRECTIONS[spec.direction]
        step = (np.array([x, y]) - start[0] + data.SIZE / 2) % data.SIZE - data.SIZE / 2
        assert np.allclose(step, [3 * dx * data.SPEED, 3 * dy * data.SPEED])


@pytest.mark.parametrize("frame", [0, 3, 9])
def test_meeting_roll_brings_a_group_member_onto_the_anchor_clip(frame):
    import numpy as np

    specs = data.scene_group(np.random.default_rng(frame), "blue", "triangle")
    pixels_per_latent = 4  # the demo VAE's downsampling; SPEED is one latent pixel per frame
    velocity = torch.tensor([data.DIRECTIONS[s.direction] for s in specs]) * data.SPEED / pixels_per_latent
    anchor = specs[0]  # moving right
    anchor_frame = data.shape_mask(anchor, 1, start=frame)[0]
    for spec, v in zip(specs, velocity):
        dy, dx = (pixels_per_latent * train.meeting_roll(frame, velocity[0], v)).tolist()
        rolled = np.roll(data.shape_mask(spec, frame + 2), (dy, dx), axis=(-2, -1))
        assert np.allclose(rolled[frame], anchor_frame, atol=1e-5), spec.direction  # they meet in `frame`
        if frame > 0 and spec.direction != anchor.direction:
            assert not np.allclose(rolled[frame + 1], data.shape_mask(anchor, 1, start=frame + 1)[0], atol=1e-2)


def test_velocity_towards_a_clip_recovers_it():
    sched = train.train_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, other, noise = (torch.randn(3, 4, 2, 5, 5, generator=g) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    noisy = sched.add_noise(x0, noise, t)
    assert torch.allclose(train.velocity_towards(sched, noisy, x0, t), sched.get_velocity(x0, noise, t), atol=1e-4)
    v = train.velocity_towards(sched, noisy, other, t)
    alpha_bar = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * v, other, atol=1e-4)


def test_counterfactual_training_runs_and_needs_clip_groups(tmp_path, run, capsys):
    import shutil

    other = tmp_path / "cf"
    other.mkdir()
    for name in ("vae", "tokenizer"):
        shutil.copytree(run / name, other / name)
    clips = torch.load(run / "latents.pt")
    torch.save({k: v for k, v in clips.items() if k != "partners"}, other / "latents.pt")  # the older format
    args = ("--out", str(other), "--stage", "unet", "--max-steps", "2", "--counterfactual", "1",
            "--counterfactual-min-t", "0", "--window", "4,16")  # a short window anchors the target at its first frame
    assert "no clip groups" in _refused(capsys, *args)
    torch.save(clips, other / "latents.pt")
    done = _train(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "direction drawn anew for 100%" in done.stderr and "windows of 4,16 frames" in done.stderr
    assert torch.load(other / "checkpoint.pt", weights_only=False)["step"] == 2
    assert "frame counts separated by commas" in _refused(capsys, *args[:-1], "4,x")
