"""Train the tiny demo text-to-video model on procedural videos (:mod:`video_infinity.demo.data`).

    python -m video_infinity.demo.train --out .demo_work/run [--resume] [--minutes 90]

(``--family wan``: the Wan-architecture demo model, :mod:`video_infinity.demo.train_wan`.)

Stages, each skipped when its output already exists in ``--out``:

1. ``vae``: a small AutoencoderKL (x4 downsampling, 4 latent channels), the shape's pixels weighted
   ~10x in the reconstruction loss (else it learns only the background); its ``scaling_factor`` is set
   to 1 / (std of the latents) afterwards.
2. ``latents``: a fixed set of 16-frame training clips, encoded once by the VAE, in groups of four:
   one start (colour, shape, position in frame 0) moving each way.
3. ``unet``: a small UNet3DConditionModel, v-prediction on a zero-terminal-SNR schedule, conditioned
   on a small CLIP text encoder that stays as initialised (``--text-encoder frozen``, the default: a
   jointly trained one learned to carry the colour and to drown the direction word; see
   ``new_text_encoder``) or is trained with the UNet (``--text-encoder trained``); min-SNR loss
   weighting, EMA, 10% caption dropout (for classifier-free guidance), time-reversal augmentation
   (reversed clip, opposite direction; not with the motion trail, which must trail).
   ``--init`` fine-tunes another run's weights (``--boost-directions``: see below).
   ``--counterfactual``: at high noise (t >= ``--counterfactual-min-t``), where sampling settles the
   direction, the caption's direction is drawn anew and the group's clip moving that way, rolled to
   meet the source clip at the window's first frame, is the target, so the prompt rather than the
   faint motion in the noise must choose it (``--window 4,16``: short windows keep every frame near
   that anchor). Atomic,
   resumable checkpoints every few minutes; the loss curve goes to ``loss.csv``; a few samples are
   probed for colour and direction every ``--eval-minutes``.
4. ``export``: the EMA weights as a diffusers pipeline folder (``--export DIR``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import data

logger = logging.getLogger("video_infinity.demo.train")

MAX_LENGTH = 16
"""Tokens per prompt (captions have ~7); a shorter context makes cross-attention cheaper."""
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "trained_betas": None,
}
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=data.SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
    up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    attention_head_dim=16,
)
UNET_TEXT_AT_EVERY_LEVEL: dict[str, Any] = {
    **UNET_CONFIG,
    "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
    "up_block_types": ("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
}
"""``--text-at-every-level``: cross-attention (and temporal attention) at 16x16 latents too, where the
motion is one latent pixel a frame, not only at 8x8."""
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=data.SIZE,
)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=64,
)
EVAL_PROMPTS = [  # every colour, shape and direction
    ("red", "circle", "right"), ("green", "square", "left"), ("blue", "triangle", "up"), ("yellow", "circle", "down"),
    ("red", "square", "up"), ("green", "triangle", "down"), ("blue", "circle", "left"), ("yellow", "triangle", "right"),
]
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}


# --------------------------------------------------------------------------------------------------
# Building blocks


def write_tokenizer(folder: Path) -> None:
    """CLIP tokenizer files (random_model's vocabulary: every caption word is one token)."""
    from .random_model import _write_tokenizer, build_vocab

    vocab, merges = build_vocab()
    missing = [w for w in data.caption_words() if f"{w}</w>" not in vocab]
    if missing:
        raise RuntimeError(f"caption words missing from the vocabulary: {missing}")
    _write_tokenizer(folder, vocab, merges)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["model_max_length"] = MAX_LENGTH
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").exists():
        write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def new_text_encoder(tokenizer: Any, seed: int) -> torch.nn.Module:
    """A small CLIP text encoder with CLIP's initialisation.

    Left untrained (frozen), it still gives every caption word a comparable share of the hidden
    states: "right" vs "left" differ by ~2.4-3 per position from the direction word on, "red" vs
    "blue" by ~2 from the colour word on (norm 8). Trained jointly with the UNet, it learned to
    carry the colour (~11) and shrank the direction word to ~0.3 at one position, so the UNet never
    learned to follow directions (18.8% of samples, chance 25%).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def new_unet(seed: int, config: dict[str, Any] = UNET_CONFIG) -> torch.nn.Module:
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(**config)


def new_vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def train_scheduler() -> Any:
    from diffusers import DDPMScheduler

    config = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("_class_name", "set_alpha_to_one", "steps_offset")}
    return DDPMScheduler.from_config(config)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def install_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` at ``target`` by renames, replacing what was there (a reader sees
    the old folder or the new one, never half of one)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`video_infinity.atomic.atomic_output`."""
    from ..atomic import atomic_output

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def train_vae(out: Path, minutes: float, seed: int, batch: int = 16, shape_weight: float = 10.0,
              scale_clips: int = 64) -> None:
    """Train the VAE for ``minutes``; its ``scaling_factor`` is 1 / the latent std over ``scale_clips``
    random 8-frame clips."""
    path = out / "vae"
    if (path / "config.json").exists():
        logger.info("vae: %s exists, skipping", path)
        return
    vae = new_vae(seed).train()
    logger.info("vae: %.2f M parameters, training %.1f min", sum(p.numel() for p in vae.parameters()) / 1e6, minutes)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    step, running = 0, None
    rows = []
    while time.perf_counter() - start < minutes * 60:
        specs = [data.random_spec(rng) for _ in range(batch)]
        starts = rng.integers(0, 16, size=batch)
        frames = np.stack([data.render(s, 1, int(t))[0] for s, t in zip(specs, starts)])
        masks = np.stack([data.shape_mask(s, 1, int(t))[0] for s, t in zip(specs, starts)])
        x = to_pixels(frames)
        weight = 1.0 + (shape_weight - 1.0) * F.max_pool2d(torch.from_numpy(masks)[:, None], 3, 1, 1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (weight * (recon - x) ** 2).mean()
        kl = posterior.kl().mean() / (x.shape[-1] * x.shape[-2])
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0:
            logger.info("vae step %d  loss %.5f (rec %.5f, kl %.2f)  %.0f s", step, running, rec.item(), kl.item(),
                        time.perf_counter() - start)
            rows.append((step, round(time.perf_counter() - start, 1), running))
    vae.eval()
    with torch.no_grad():
        frames, _ = data.batch(np.random.default_rng(seed + 1), scale_clips, 8)
        latents = vae.encode(to_pixels(frames.reshape(-1, data.SIZE, data.SIZE, 3))).latent_dist.mode()
        std = float(latents.std())
        recon = vae.decode(latents).sample
        err = float((recon - to_pixels(frames.reshape(-1, data.SIZE, data.SIZE, 3))).abs().mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    logger.info("vae: %d steps, latent std %.4f -> scaling_factor %.4f, mean abs error %.4f", step, std, 1 / std, err)
    tmp = out / ".vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    with open(out / "vae_loss.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("step", "seconds", "loss"), *rows])
    os.replace(tmp, path)


def load_vae(out: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out / "vae").eval()


# --------------------------------------------------------------------------------------------------
# Stage 2: training clips as latents


def encode_clips(out: Path, clips_per_class: int, seed: int, frames: int = 16, trail: data.Trail = data.NO_TRAIL) -> None:
    """Encode ``clips_per_class`` clips of every class, in groups of one clip per direction.

    The clips of a group share colour, shape and the shape's position in frame 0: the same start,
    the object moving each way. ``partners[i, k]`` is the index of clip i's group member moving in
    direction k (data.DIRECTIONS order), for counterfactual training (``--counterfactual``).
    """
    path = out / "latents.pt"
    if path.exists():
        if tuple(map(tuple, torch.load(path).get("trail", ()))) != tuple(trail):
            raise SystemExit(f"{path} holds clips rendered with another --trail: remove it or pass the same --trail")
        logger.info("latents: %s exists, skipping", path)
        return
    vae = load_vae(out)
    rng = np.random.default_rng(seed + 2)
    classes = data.all_classes()
    class_index = {c: i for i, c in enumerate(classes)}
    latents, labels, partners = [], [], []
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(clips_per_class):
            for colour, shape in dict.fromkeys((c, s) for c, s, _ in classes):
                specs = data.scene_group(rng, colour, shape)
                x = to_pixels(np.concatenate([data.render(spec, frames, trail=trail) for spec in specs]))
                z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor  # (4 * F, C, h, w)
                z = z.reshape(len(specs), frames, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # (4, C, F, h, w)
                first = len(labels)
                latents.extend(z.to(torch.float16))
                labels.extend(class_index[(colour, shape, spec.direction)] for spec in specs)
                partners.extend([list(range(first, first + len(specs)))] * len(specs))
            if k % 10 == 0:
                logger.info("latents: %d/%d clips per class, %.0f s", k + 1, clips_per_class, time.perf_counter() - start)
    save_atomic({"latents": torch.stack(latents), "labels": torch.tensor(labels), "classes": classes,
                 "partners": torch.tensor(partners), "trail": [list(t) for t in trail]}, path)
    logger.info("latents: %d clips in %.0f s", len(labels), time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Stage 3: UNet + text encoder


def snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for a v-prediction loss: the x0 loss weighted by min(SNR + 1, gamma)
    (SNR + 1 is the weight plain v-prediction gives; truncating it keeps the near-clean steps from
    dominating, and the zero-SNR step keeps a weight of 1)."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    return torch.clamp(snr + 1, max=gamma) / (snr + 1)


def velocity_towards(scheduler: Any, noisy: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target that turns ``noisy`` into ``x0`` at ``timesteps`` (x0 = alpha * noisy - sigma * v),
    whichever clean clip ``noisy`` was made from; for its own clip it is ``scheduler.get_velocity``."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].reshape(-1, *[1] * (noisy.dim() - 1))
    return (alpha_bar.sqrt() * noisy - x0) / (1 - alpha_bar).sqrt()


def meeting_roll(frame: int, anchor_velocity: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """(dy, dx) roll, in latent pixels, that puts a clip moving at ``velocity`` where a clip moving at
    ``anchor_velocity`` from the same frame-0 position is in ``frame`` (velocities (..., 2) as (dx, dy)
    latent pixels per frame): the two then meet there."""
    dx, dy = (frame * (anchor_velocity - velocity)).round().long().unbind(-1)
    return torch.stack([dy, dx], dim=-1)


class Ema:
    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for ema_p, p in zip(self.shadow[name].parameters(), module.parameters()):
                ema_p.lerp_(p.detach(), 1 - decay)


WHOLE_WINDOW_ENGINE = {"attn": {"padding": 1 << 16, "top_k": 0, "local_phase": None, "global_phase": None},
                       "split_invariant": False}
"""Engine settings under which the pipeline equals plain diffusers sampling (training samples are short)."""


def sample(unet: Any, text_encoder: Any, tokenizer: Any, vae: Any, prompts: list[str], frames: int = 16,
           steps: int = 20, guidance: float = 5.0, seed: int = 0, scheduler_name: str = "ddim") -> np.ndarray:
    """Plain (single-process) samples for evaluation during training, made by the package's pipeline
    on the components being trained: uint8 (len(prompts), F, H, W, 3); prompt i uses seed + i."""
    from ..families.unet3d.family import UNet3DFamily
    from ..pipeline import VideoInfinityPipeline

    family = UNet3DFamily(tokenizer, text_encoder, vae, unet, dict(SCHEDULER_CONFIG), False, "training")
    pipe = VideoInfinityPipeline(family, WHOLE_WINDOW_ENGINE)
    videos = []
    for i, prompt in enumerate(prompts):
        video = pipe(prompt, num_frames=frames, height=data.SIZE, width=data.SIZE, num_inference_steps=steps,
                     guidance_scale=guidance, scheduler=scheduler_name, seed=seed + i, progress=False).frames[0]
        videos.append((video * 255).round().astype(np.uint8))
    return np.stack(videos)


def evaluate_quick(unet: Any, text_encoder: Any, tokenizer: Any, vae: Any, seed: int) -> dict[str, Any]:
    from .probe import analyse

    prompts = [data.caption(*c) for c in EVAL_PROMPTS]
    videos = sample(unet, text_encoder, tokenizer, vae, prompts, seed=seed)
    colour = direction = 0
    found = []
    for (c, _s, d), video in zip(EVAL_PROMPTS, videos):
        report = analyse(video)
        colour += report.colour == c
        direction += report.direction == d
        found.append(f"{report.colour}/{report.direction}")
    return {"colour": colour / len(prompts), "direction": direction / len(prompts), "found": found, "videos": videos}


def _checkpoint(out: Path) -> Path:
    return out / "checkpoint.pt"


def _unet_config_of(state: dict[str, Any]) -> dict[str, Any]:
    """The UNet configuration a checkpoint or EMA snapshot was trained with (older ones: the default)."""
    return dict(state.get("config", {}).get("unet", UNET_CONFIG))


def _load_weights(path: Path, unet_config: dict[str, Any], device: str, modules: dict[str, torch.nn.Module],
                  ema: Ema) -> dict[str, Any]:
    """Load a checkpoint's weights (EMA included) into ``modules`` and ``ema``; returns the checkpoint."""
    state = torch.load(path, weights_only=False, map_location=device)
    if _unet_config_of(state) != dict(unet_config):
        raise SystemExit(f"{path} holds another UNet configuration: pass the same --text-at-every-level")
    for name, module in modules.items():
        module.load_state_dict(state[name])
        ema.shadow[name].load_state_dict(state["ema_" + name])
    return state


def train_unet(out: Path, minutes: float, seed: int, resume: bool, batch: int = 4, lr: float = 5e-4,
               gamma: float = 5.0, ema_decay: float = 0.999, checkpoint_minutes: float = 5.0,
               eval_minutes: float = 15.0, max_steps: int | None = None, window: int | Sequence[int] = 16,
               high_noise: float = 0.0, init: Path | None = None, boost_directions: float = 1.0,
               train_text_encoder: bool = False, device: str = "cpu",
               unet_config: dict[str, Any] = UNET_CONFIG, counterfactual: float = 0.0,
               counterfactual_min_t: int = 800) -> None:
    tokenizer = load_tokenizer(out / "tokenizer")
    vae = load_vae(out).to(device)
    clips = torch.load(out / "latents.pt")
    latents_all, labels_all = clips["latents"], clips["labels"]
    # Playing a clip backwards shows the opposite motion, a free second example, unless the shape
    # drags a trail: reversed, the trail would lead, and the trail's side would no longer tell the
    # direction (a run with both learned directions below chance: 0 of 8).
    time_reversal = not clips.get("trail")
    classes = [tuple(c) for c in clips["classes"]]
    class_index = {c: i for i, c in enumerate(classes)}
    # Token ids per class, and per class with the opposite direction (for time-reversed clips).
    prompts = [data.caption(*c) for c in classes]
    ids = tokenize(tokenizer, prompts)
    reverse = torch.tensor([class_index[(c, s, OPPOSITE[d])] for c, s, d in classes])
    empty = tokenize(tokenizer, [""])[0]
    clip_frames = latents_all.shape[2]
    # Several lengths take turns step by step: short windows put every frame within a few temporal
    # convolutions of the window's first frame, where a counterfactual target is anchored (below).
    windows = [min(w, clip_frames) for w in ([window] if isinstance(window, int) else window)]
    partners = clips.get("partners")
    # Objects move a whole number of latent pixels per frame, so a group member rolled by
    # first * (v_source - v_target) latent pixels passes where the source is at frame ``first``.
    latent_speed = data.SPEED * latents_all.shape[-1] / data.SIZE
    velocity = torch.tensor([data.DIRECTIONS[d] for _c, _s, d in classes]) * latent_speed  # per class (dx, dy)
    if counterfactual > 0 and partners is None:
        raise SystemExit(f"{out / 'latents.pt'} has no clip groups (older format): remove it to re-encode the clips "
                         "for --counterfactual")

    ids, empty, reverse = ids.to(device), empty.to(device), reverse.to(device)
    unet = new_unet(seed, unet_config).to(device).train()
    text_encoder = new_text_encoder(tokenizer, seed + 3).to(device)
    text_encoder.train(train_text_encoder).requires_grad_(train_text_encoder)
    modules = {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = Ema(modules, ema_decay)
    scheduler = train_scheduler()
    step, trained_seconds = 0, 0.0
    gen = torch.Generator().manual_seed(seed + 4)
    ckpt_path = _checkpoint(out)
    if resume and ckpt_path.exists():
        state = _load_weights(ckpt_path, unet_config, device, modules, ema)
        if state.get("config", {}).get("train_text_encoder", True) != train_text_encoder:
            raise SystemExit(f"{ckpt_path} was trained with --text-encoder "
                             f"{'trained' if state['config'].get('train_text_encoder', True) else 'frozen'}: pass that again")
        opt.load_state_dict(state["opt"])
        step, trained_seconds = state["step"], state["seconds"]
        gen.set_state(state["generator"])
        logger.info("unet: resumed from %s at step %d (%.1f min trained)", ckpt_path, step, trained_seconds / 60)
    elif ckpt_path.exists():
        raise SystemExit(f"{ckpt_path} exists: pass --resume, or remove it to start over")
    elif init is not None:  # fine-tune another run's weights (EMA included), fresh optimiser and step count
        state = _load_weights(init, unet_config, device, modules, ema)
        logger.info("unet: initialised from %s (step %d there)", init, state["step"])
        if boost_directions != 1.0:
            # The jointly trained text encoder spreads the colour (an early word) over every later
            # position but leaves the direction word (the last one) nearly invisible: hidden states
            # differ by ~0.3 between directions vs ~11 between colours. Scaling the direction words'
            # embeddings makes them visible (x10: ~4 at their own position). In 22 minutes of
            # fine-tuning that did not yet teach the UNet to follow them (direction 29%).
            with torch.no_grad():
                for encoder in (text_encoder, ema.shadow["text_encoder"]):
                    embeddings = encoder.get_input_embeddings().weight
                    for word in data.DIRECTIONS:
                        embeddings[tokenizer.convert_tokens_to_ids(f"{word}</w>")] *= boost_directions
            logger.info("unet: direction word embeddings scaled by %g", boost_directions)
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    n_text = sum(p.numel() for p in text_encoder.parameters()) / 1e6
    logger.info("unet: %.2f M parameters, text encoder %.2f M (%s); %d clips (time reversal %s); windows of %s "
                "frames; batch %d; lr %g; min-SNR gamma %g; high-noise share %g; %s", n_unet, n_text,
                "trained" if train_text_encoder else "frozen", len(labels_all), "on" if time_reversal else "off",
                ",".join(map(str, windows)), batch, lr, gamma, high_noise, device)
    if counterfactual > 0:
        logger.info("unet: direction drawn anew for %.0f%% of the captioned samples at t >= %d", 100 * counterfactual,
                    counterfactual_min_t)

    def save() -> None:
        state = {name: m.state_dict() for name, m in modules.items()}
        state.update({"ema_" + name: m.state_dict() for name, m in ema.shadow.items()})
        state.update(opt=opt.state_dict(), step=step, seconds=trained_seconds, generator=gen.get_state(),
                     config={"unet": dict(unet_config), "text": TEXT_CONFIG, "scheduler": SCHEDULER_CONFIG,
                             "train_text_encoder": train_text_encoder})
        save_atomic(state, ckpt_path)
        save_atomic({k: v for k, v in state.items() if k.startswith("ema_")} | {"step": step, "config": state["config"]},
                    out / "ema" / f"ema_{step:06d}.pt")
        logger.info("unet: checkpoint at step %d (%.1f min trained)", step, trained_seconds / 60)

    loss_log = LossLog(out)

    session_start = time.perf_counter()
    last_ckpt = last_eval = time.perf_counter()
    running = None
    log_every = 25
    window_loss = []
    try:
        while time.perf_counter() - session_start < minutes * 60 and (max_steps is None or step < max_steps):
            if (out / "STOP").exists():
                logger.info("unet: %s found, stopping", out / "STOP")
                break
            t0 = time.perf_counter()
            idx = torch.randint(len(labels_all), (batch,), generator=gen)
            window = windows[step % len(windows)]
            first = int(torch.randint(0, clip_frames - window + 1, (1,), generator=gen)) if window < clip_frames else 0
            flip = ((torch.rand(batch, generator=gen) < 0.5) & time_reversal).to(device)
            # Random whole-latent-pixel shifts (the VAE is shift-equivariant up to its borders).
            shifts = torch.randint(0, latents_all.shape[-1], (batch, 2), generator=gen)
            drop = torch.rand(batch, generator=gen) < 0.1
            noise = torch.randn((batch, *latents_all.shape[1:2], window, *latents_all.shape[3:]), generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
            if high_noise > 0:  # a share of the batch at high noise, where the prompt decides the motion
                n_train = scheduler.config.num_train_timesteps
                high = torch.randint(int(0.6 * n_train), n_train, (batch,), generator=gen)
                t = torch.where(torch.rand(batch, generator=gen) < high_noise, high, t)
            target_idx = idx
            if counterfactual > 0:  # the caption's direction drawn anew; the same scene moving that way is the target
                direction = torch.randint(0, len(data.DIRECTIONS), (batch,), generator=gen)
                use = (torch.rand(batch, generator=gen) < counterfactual) & (t >= counterfactual_min_t) & ~drop
                use &= ~flip.cpu()  # not on time-reversed clips
                if not (first * latent_speed).is_integer():  # no exact re-anchoring: the groups share frame 0 only
                    use &= first == 0
                target_idx = torch.where(use, partners[idx, direction], idx)

            def clips_at(index: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
                x = latents_all[index].to(device).float()[:, :, first:first + window]
                x = torch.where(flip[:, None, None, None, None], x.flip(2), x)
                offsets = shifts.clone()
                if anchor is not None:  # meet the anchor clip at the window's first frame
                    offsets += meeting_roll(first, velocity[labels_all[anchor]], velocity[labels_all[index]])
                return torch.stack([torch.roll(c, (int(a), int(b)), dims=(-2, -1)) for c, (a, b) in zip(x, offsets)])

            x0 = clips_at(idx)
            label = labels_all[target_idx].to(device)
            label = torch.where(flip, reverse[label], label)
            tokens = torch.where(drop[:, None].to(device), empty[None], ids[label])
            weight = snr_weights(scheduler, t, gamma).to(device)
            t = t.to(device)
            noisy = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t)
            swapped = (target_idx != idx).to(device)
            if bool(swapped.any()):
                towards = velocity_towards(scheduler, noisy, clips_at(target_idx, anchor=idx), t)
                target = torch.where(swapped[:, None, None, None, None], towards, target)
            with torch.set_grad_enabled(train_text_encoder):
                text = text_encoder(tokens)[0]
            pred = unet(noisy, t, encoder_hidden_states=text).sample
            per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3, 4))
            loss = (per_sample * weight).mean()
            current_lr = lr * min(1.0, (step + 1) / 200)
            for group in opt.param_groups:
                group["lr"] = current_lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            ema.update(modules, step)
            trained_seconds += time.perf_counter() - t0
            window_loss.append(loss.item())
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % log_every == 0:
                mean = float(np.mean(window_loss))
                window_loss.clear()
                loss_log.row(step, trained_seconds, mean, current_lr)
                logger.info("unet step %d  loss %.4f (ema %.4f)  %.2f s/step  %.1f min trained", step, mean, running,
                            time.perf_counter() - t0, trained_seconds / 60)
            now = time.perf_counter()
            if now - last_ckpt > checkpoint_minutes * 60:
                save()
                last_ckpt = now
            if eval_minutes > 0 and now - last_eval > eval_minutes * 60:
                result = evaluate_quick(ema.shadow["unet"], ema.shadow["text_encoder"], tokenizer, vae, seed)
                record_eval(out, "unet", step, trained_seconds, result)
                last_eval = time.perf_counter()
    finally:
        save()
        loss_log.close()


class LossLog:
    """``out/loss.csv`` (step, trained seconds, mean loss, learning rate), appended to across resumes
    and flushed every row, so that a killed run's curve is on disk up to its last row."""

    def __init__(self, out: Path) -> None:
        path = out / "loss.csv"
        new = not path.exists()
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(("step", "trained_seconds", "loss", "lr"))

    def row(self, step: int, trained_seconds: float, loss: float, lr: float) -> None:
        self._writer.writerow((step, round(trained_seconds, 1), f"{loss:.5f}", f"{lr:.2e}"))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def record_eval(out: Path, model: str, step: int, trained_seconds: float, result: dict[str, Any]) -> None:
    """A training-time evaluation (``evaluate_quick``'s result): its samples' sheet, a log line and a
    row of ``out/eval.csv``."""
    _save_eval_sheet(out, step, result["videos"])
    if not (out / "eval.csv").exists():
        (out / "eval.csv").write_text("step,trained_seconds,colour,direction,found\n")
    logger.info("%s eval at step %d: colour %.0f%%, direction %.0f%%: %s", model, step,
                100 * result["colour"], 100 * result["direction"], " ".join(result["found"]))
    with open(out / "eval.csv", "a") as fh:
        fh.write(f"{step},{trained_seconds:.0f},{result['colour']},{result['direction']},"
                 f"{' '.join(result['found'])}\n")


def _save_eval_sheet(out: Path, step: int, videos: np.ndarray) -> None:
    from ..video_io import videos_sheet, write_png

    write_png(out / "samples" / f"step_{step:06d}.png", videos_sheet(videos))  # one row per prompt


# --------------------------------------------------------------------------------------------------
# Stage 4: export


def export(out: Path, target: Path, ema_file: Path | None = None) -> Path:
    """Write the EMA weights as a diffusers pipeline folder at ``target`` (replaced atomically)."""
    import diffusers

    tokenizer = load_tokenizer(out / "tokenizer")
    state = torch.load(ema_file or _checkpoint(out), weights_only=False, map_location="cpu")
    unet = new_unet(0, _unet_config_of(state))
    unet.load_state_dict(state["ema_unet"])
    text_encoder = new_text_encoder(tokenizer, 0)
    text_encoder.load_state_dict(state["ema_text_encoder"])
    vae = load_vae(out)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text_encoder.save_pretrained(tmp / "text_encoder")
        write_tokenizer(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({**SCHEDULER_CONFIG, "_diffusers_version": diffusers.__version__}, indent=2, sort_keys=True) + "\n")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "TextToVideoSDPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet3DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(
            "Tiny demo text-to-video model trained by `python -m video_infinity.demo.train` on procedural videos "
            "(one coloured circle, square or triangle moving right, left, up or down on a grey background; "
            f"prompts like \"a red circle moving right\"). EMA weights after {state.get('step', '?')} steps.\n")
        for stale in tmp.rglob("*"):
            if stale.is_file() and stale.suffix in (".bin",):
                stale.unlink()
        install_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    logger.info("exported step %s to %s (%.1f MB)", state.get("step"), target, size / 1e6)
    return target


# --------------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give frame counts separated by commas, e.g. 4,16") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: window lengths must be at least 1 frame")
    return lengths


def main(argv: list[str] | None = None) -> int:
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", choices=("unet3d", "wan"), default="unet3d")
    known, rest = family.parse_known_args(argv)
    if known.family == "wan":  # the Wan-architecture demo model: its own stages (train_wan)
        from .train_wan import main as train_wan_main

        return train_wan_main(rest)
    parser = argparse.ArgumentParser(prog="python -m video_infinity.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("unet3d", "wan"), default="unet3d",
                        help="which demo model: the UNet3D one (these options) or the Wan one (--family wan --help)")
    parser.add_argument("--out", required=True, type=Path, help="work folder (checkpoints, logs, samples)")
    parser.add_argument("--stage", choices=("all", "vae", "latents", "unet", "export"), default="all")
    parser.add_argument("--resume", action="store_true", help="continue the UNet from out/checkpoint.pt")
    parser.add_argument("--minutes", type=float, default=90.0, help="UNet training time for this run")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--vae-minutes", type=float, default=6.0)
    parser.add_argument("--vae-scale-clips", type=int, default=64,
                        help="random 8-frame clips whose latent std sets the VAE's scaling_factor")
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--trail", choices=("on", "off"), default="on",
                        help="training clips show a fading motion trail behind the shape (data.TRAIL) or not")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--window", type=_lengths, default=(16,),
                        help="frames per training window (clips have 16); several (e.g. 4,16) take turns step by step")
    parser.add_argument("--high-noise", type=float, default=0.0,
                        help="share of samples drawn from the noisiest 40%% of timesteps")
    parser.add_argument("--counterfactual", type=float, default=0.0,
                        help="share of captioned samples at t >= --counterfactual-min-t whose direction is drawn "
                             "anew (uniformly), the same scene moving that way being the target: the prompt, not "
                             "the faint motion in the noise, then chooses the direction")
    parser.add_argument("--counterfactual-min-t", type=int, default=800)
    parser.add_argument("--init", type=Path, default=None,
                        help="start the UNet and text encoder from this checkpoint.pt (another run's)")
    parser.add_argument("--boost-directions", type=float, default=1.0,
                        help="with --init: scale the direction words' token embeddings by this factor")
    parser.add_argument("--text-encoder", choices=("frozen", "trained"), default="frozen",
                        help="keep the text encoder as initialised (default) or train it with the UNet")
    parser.add_argument("--text-at-every-level", action="store_true",
                        help="UNet with cross-attention at 16x16 latents too (UNET_TEXT_AT_EVERY_LEVEL)")
    parser.add_argument("--device", default="cpu", help="torch device for the UNet stage (e.g. cuda)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--eval-minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export", type=Path, default=None, help="write the EMA model as a pipeline folder here")
    parser.add_argument("--ema-file", type=Path, default=None, help="export this EMA snapshot instead of the checkpoint")
    args = parser.parse_args(argv)
    if args.boost_directions != 1.0 and args.init is None:
        parser.error("--boost-directions applies to the weights --init loads: pass --init CHECKPOINT too")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    signal.signal(signal.SIGTERM, _terminate)  # checkpoint on `kill PID` too
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.out / "tokenizer")
    if args.stage in ("all", "vae"):
        train_vae(args.out, args.vae_minutes, args.seed, scale_clips=args.vae_scale_clips)
    if args.stage in ("all", "latents"):
        encode_clips(args.out, args.clips_per_class, args.seed, trail=data.TRAIL if args.trail == "on" else data.NO_TRAIL)
    if args.stage in ("all", "unet"):
        train_unet(args.out, args.minutes, args.seed, args.resume, batch=args.batch, lr=args.lr,
                   checkpoint_minutes=args.checkpoint_minutes, eval_minutes=args.eval_minutes, max_steps=args.max_steps,
                   ema_decay=args.ema_decay, window=args.window, high_noise=args.high_noise,
                   init=args.init, boost_directions=args.boost_directions,
                   train_text_encoder=args.text_encoder == "trained", device=args.device,
                   unet_config=UNET_TEXT_AT_EVERY_LEVEL if args.text_at_every_level else UNET_CONFIG,
                   counterfactual=args.counterfactual, counterfactual_min_t=args.counterfactual_min_t)
    if args.export is not None and args.stage in ("all", "export"):
        export(args.out, args.export, args.ema_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
