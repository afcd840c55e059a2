"""Model loading through the real diffusers/transformers code, on tiny random models saved to disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet3DConditionModel
from transformers import CLIPTokenizer

from video_infinity.demo.random_model import build_random_model
from video_infinity.families.unet3d.model import FpsUNet3DConditionModel, ModelLoadError, load_model, load_unet


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"plain": build_random_model(root / "plain"), "fps": build_random_model(root / "fps", fps_cond=True)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _unet_out(unet: UNet3DConditionModel, latents: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return unet(latents, 500, torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)), **kwargs).sample


def test_random_model_is_small_deterministic_and_loads(models: dict[str, Path], tmp_path: Path) -> None:
    folder = models["plain"]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 2 * 1024 * 1024
    again = build_random_model(tmp_path / "again")
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (folder / name).read_bytes() == (again / name).read_bytes()

    components = load_model(str(folder))
    assert type(components.unet) is UNet3DConditionModel and not components.fps_conditioned
    assert not components.unet.training and not components.vae.training and not components.text_encoder.training
    assert components.unet.dtype == torch.float32
    assert components.scheduler_config["beta_schedule"] == "scaled_linear"
    assert components.scheduler_config["prediction_type"] == "epsilon"

    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = _unet_out(components.unet, latents)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # The zero-initialised temporal convs were randomised: other frames change frame 0's output.
    changed = latents.clone()
    changed[:, :, 2] = torch.randn(1, 4, 8, 8)
    assert (_unet_out(components.unet, changed)[:, :, 0] - out[:, :, 0]).abs().mean() > 1e-3

    ids = components.tokenizer(["a red circle moving right"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        emb = components.text_encoder(ids)[0]
        image = components.vae.decode(torch.randn(1, 4, 8, 8)).sample
    assert emb.shape == (1, 77, 32) and image.shape == (1, 3, 64, 64)


def test_fps_conditioned_model(models: dict[str, Path], tmp_path: Path) -> None:
    components = load_model(str(models["fps"]))
    unet = components.unet
    assert isinstance(unet, FpsUNet3DConditionModel) and components.fps_conditioned
    assert json.loads((models["fps"] / "unet" / "config.json").read_text())["fps_cond"] is True
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out8, out24 = _unet_out(unet, latents, fps=8), _unet_out(unet, latents, fps=24)
    assert (out8 - out24).abs().mean() > 1e-3
    assert torch.equal(out24, _unet_out(unet, latents, fps=24))
    assert torch.equal(out24, _unet_out(unet, latents))  # default fps is 24
    assert unet._pending_fps_emb is None  # hook state does not outlive the call

    # save_pretrained / load_unet round trip keeps the class, the flag and the weights.
    unet.save_pretrained(tmp_path / "resaved")
    again = load_unet(str(tmp_path / "resaved"), torch.float32).eval()
    assert isinstance(again, FpsUNet3DConditionModel) and again.config.fps_cond
    assert torch.allclose(_unet_out(again, latents, fps=8), out8, atol=1e-5)  # kernels may differ in the last bit

    # dtype casting: the fps embedding follows the model's dtype.
    half = load_unet(str(models["fps"]), torch.bfloat16, subfolder="unet").eval()
    with torch.no_grad():
        out = half(latents.bfloat16(), 500, torch.randn(2, 77, 32).bfloat16()[:1], fps=torch.tensor([8])).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_unet_only_folder_with_base_model(models: dict[str, Path], tmp_path: Path) -> None:
    unet_only = _copy(models["fps"] / "unet", tmp_path / "vc2")
    with pytest.raises(ModelLoadError, match="base_model"):
        load_model(str(unet_only))
    components = load_model(str(unet_only), base_model=str(models["plain"]))
    assert components.fps_conditioned and isinstance(components.unet, FpsUNet3DConditionModel)
    assert str(unet_only) in components.source and str(models["plain"]) in components.source


def test_hub_id_from_cache(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--demo--tiny-t2v"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    _copy(models["plain"], repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert type(load_model("demo/tiny-t2v").unet) is UNet3DConditionModel


@pytest.mark.parametrize("name", ["someone/not-downloaded", str(Path("/nonexistent/model/folder"))])
def test_missing_model_offline(name: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    assert "\n" not in message and "download" in message and name in message and "offline" in message


def test_folder_missing_component(models: dict[str, Path], tmp_path: Path) -> None:
    broken = _copy(models["plain"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="vae") as info:
        load_model(str(broken))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("component", "damage"),
    [
        ("unet", "truncate"),
        ("unet", "bad_json"),
        ("unet", "wrong_shapes"),
        ("unet", "wrong_weights"),
        ("text_encoder", "wrong_shapes"),
        ("vae", "truncate"),
        ("scheduler", "bad_json"),
    ],
)
def test_corrupt_component(models: dict[str, Path], tmp_path: Path, component: str, damage: str) -> None:
    broken = _copy(models["plain"], tmp_path / "broken")
    sub = broken / component
    if damage == "truncate":
        weights = next(sub.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "bad_json":
        next(sub.glob("*config.json")).write_text("{not json")
    elif damage == "wrong_shapes":
        config = json.loads((sub / "config.json").read_text())
        key = "block_out_channels" if component == "unet" else "hidden_size"
        config[key] = [32, 64] if component == "unet" else 64
        (sub / "config.json").write_text(json.dumps(config))
    else:  # a VAE checkpoint in the unet folder: every UNet weight missing
        shutil.copy(broken / "vae" / "diffusion_pytorch_model.safetensors", sub)
    with pytest.raises(ModelLoadError, match=component) as info:
        load_model(str(broken))
    assert "\n" not in str(info.value)


def test_tokenizer_round_trip(models: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(models["plain"] / "tokenizer")
    assert tokenizer.model_max_length == 77
    text = "A red circle moving right, then 3 blue squares (zebra-striped!) jump: déjà vu."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]  # byte-level: nothing is unknown
    assert len(tokenizer("a red circle moving right").input_ids) == 7  # whole-word tokens
    # CLIP's decoder turns every end-of-word into a space; the characters themselves survive.
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    tokenizer.save_pretrained(tmp_path / "tok")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text).input_ids == ids and again.model_max_length == 77
    padded = again([text, "a"], padding="max_length", max_length=77, truncation=True).input_ids
    assert [len(p) for p in padded] == [77, 77]


def test_karras_sigmas_are_not_used_on_a_zero_terminal_snr_schedule(caplog):
    from video_infinity.schedulers import make_scheduler

    base = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    plain = make_scheduler("sde-dpmsolver++-karras", base)
    assert plain.config.use_karras_sigmas
    with caplog.at_level("WARNING"):
        zero_snr = make_scheduler("sde-dpmsolver++-karras", {**base, "rescale_betas_zero_snr": True})
    assert not zero_snr.config.use_karras_sigmas and "zero-terminal-SNR" in caplog.text
    zero_snr.set_timesteps(20)
    steps = zero_snr.timesteps.tolist()
    assert len(set(steps)) == 20 and steps[0] - steps[1] > 20  # spread over the schedule, not all at t ~ 999
