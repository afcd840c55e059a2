"""Train the tiny Wan-architecture demo model on procedural videos (:mod:`video_infinity.demo.data`).

    python -m video_infinity.demo.train --family wan --out .demo_work/wan [--resume] [--minutes 90]

The same moving-shape videos and prompts as the UNet3D demo (:mod:`video_infinity.demo.train`), in
Wan2.1's architecture: a ``WanTransformer3DModel`` (patch 1x2x2, 3-D rotary positions, full
spatio-temporal attention), an ``AutoencoderKLWan`` (causal, 4x in time and in space) and a small
UMT5 text encoder, trained by flow matching as Wan is. Stages, each skipped when its output exists:

1. ``vae``: the autoencoder on random 9-frame clips (3 latent frames: the causal first frame alone,
   then twice 4 frames), deterministic (the posterior's mode), the shape's pixels weighted ~10x in the
   reconstruction loss; its ``latents_mean`` / ``latents_std`` are measured afterwards.
2. ``latents``: a fixed set of 33-frame training clips (9 latent frames) with the motion trail,
   encoded once and normalised as ``WanPipeline`` expects them.
3. ``transformer``: flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s)
   with ``s`` drawn uniformly and shifted by the scheduler's ``flow_shift`` (as sampling spaces its
   steps), on windows of 5 or 9 latent frames (17 or 33 frames) at any offset, random whole-latent-
   pixel shifts, 10% empty captions (for classifier-free guidance), EMA. The text encoder stays as
   initialised (frozen; its prompt embeddings are computed once): for the UNet3D demo a jointly
   trained one drowned the direction word (see ``train.new_text_encoder``). Atomic, resumable
   checkpoints; ``loss.csv``; 8 prompts sampled and probed every ``--eval-minutes``.
4. ``export``: the EMA weights as a ``WanPipeline`` folder (``--export DIR``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .train import (EVAL_PROMPTS, WHOLE_WINDOW_ENGINE, Ema, LossLog, _terminate, install_folder, record_eval,
                    save_atomic, to_pixels)

logger = logging.getLogger("video_infinity.demo.train_wan")

MAX_SEQUENCE_LENGTH = 512
"""Text tokens the pipeline pads every prompt to (WanPipeline's default, which the engine uses): the
zero padding's keys take part in cross-attention, so training weighs them in (:func:`trim_padding`)."""
FLOW_SHIFT = 3.0
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": FLOW_SHIFT,
    "solver_order": 2,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
}
LATENT_CHANNELS = 8
VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True, True],
    scale_factor_spatial=4, scale_factor_temporal=4,
    latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS,
)
TEXT_DIM = 64
TEXT_CONFIG: dict[str, Any] = dict(d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
SPEED = 2.0
"""Pixels a frame the shapes move in this model's videos: half the UNet3D demo's :data:`data.SPEED`.
The VAE packs 4 frames into a latent frame, so at 4 px a frame the 16-px shape moved its own width
between latent frames, a quarter of the 64-px wrap: from latent positions alone, right and left are
one sequence played forwards and backwards. The model trained at that speed moved the shape along the
prompt's axis but often the opposite way (48 prompts: 16 of 26 wrong directions, "down" going up in 8
of 12)."""
CLIP_FRAMES = 33
"""Frames per training clip (9 latent frames)."""
WINDOWS = (5, 9)
"""Latent frames per training window, taking turns step by step."""
WINDOW_STARTS = ("any", "first")
"""Where a training window starts in its clip: at ``any`` latent frame, or at the ``first`` (the causal
VAE's one-frame latent, as every video the pipeline samples begins). With ``any``, a window's first
latent frame is a one-frame latent in some steps and a four-frame one in others. Measured on the demo
weights (12-03): 1,362 steps with ``first`` after 10,694 with ``any`` took the 48-prompt colour accuracy
from 72.9% to 95.8% (direction 64.6% -> 60.4%); the first frame or two stayed garbled. Trained with
``first`` from scratch (9,618 steps, ``--decay-minutes 30``): 100% / 68.8%, first frames clean; the same
with :data:`TRAIN_TEXT_TOKENS`' faster steps (12,466 in 90 min, 12-04; the shipped weights): 100% / 89.6%."""


# --------------------------------------------------------------------------------------------------
# Building blocks


@dataclasses.dataclass(frozen=True)
class Spec(data.VideoSpec):
    """A :class:`data.VideoSpec` whose shape moves ``speed`` pixels a frame (its trail keeps its lag in
    frames)."""

    speed: float = SPEED

    def centre(self, frame: float) -> tuple[float, float]:
        return super().centre(frame * self.speed / data.SPEED)


def random_spec(rng: np.random.Generator, classes: list[tuple[str, str, str]] | None = None,
                speed: float = SPEED) -> Spec:
    """:func:`data.random_spec`'s draw (the same random numbers) at ``speed``."""
    return Spec(**dataclasses.asdict(data.random_spec(rng, classes)), speed=speed)


def new_tokenizer() -> Any:
    """A word-level tokenizer over the caption words (every word one token, ``</s>`` appended as T5 does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(data.caption_words())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_SEQUENCE_LENGTH)


def new_text_encoder(tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, **TEXT_CONFIG)
    return UMT5EncoderModel(config).eval().requires_grad_(False)


def new_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**VAE_CONFIG)


def new_transformer(seed: int) -> Any:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def new_scheduler() -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "_class_name"})


def text_pipeline(tokenizer: Any, text_encoder: Any) -> Any:
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=None, vae=None, scheduler=None)


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), MAX_SEQUENCE_LENGTH, TEXT_DIM) as WanPipeline encodes them (zero padding)."""
    embeds, _ = text_pipeline(tokenizer, text_encoder).encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu"))
    return embeds


TRAIN_TEXT_TOKENS = 16
"""Text tokens a training step keeps of the pipeline's :data:`MAX_SEQUENCE_LENGTH`: the caption's (at
most 7 with ``</s>``) and some of its zero padding, which :class:`PaddingWeight` weighs as the whole
padding. Measured (12-03, 2 cores, batch 8): a step 1.4-1.5x faster than with 512 tokens (0.26 vs
0.38 s at 5 latent frames, 0.57 vs 0.78 s at 9); over a whole 90-minute run (12-04) ~140 steps a
minute against the 512-token run's 97."""


def trim_padding(embeds: torch.Tensor, lengths: list[int],
                 keep: int = TRAIN_TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """``embeds`` (N, MAX_SEQUENCE_LENGTH, D) as :func:`encode_prompts` gives them, whose prompt ``i``
    has ``lengths[i]`` tokens before its zero padding -> (its first ``keep`` tokens, the additive
    cross-attention bias (N, 1, 1, keep) under which they attend as all of them do).

    Every padding token is the zero vector, and the transformer's text embedder and key/value
    projections work token by token, so the padding's keys and values are all one vector: attention
    over P such keys equals attention over p of them with log(P / p) added to their logits."""
    lengths_t = torch.tensor(lengths)
    if int(lengths_t.max()) >= keep:
        raise ValueError(f"a prompt of {int(lengths_t.max())} tokens leaves no padding in {keep}")
    if embeds[:, keep:].any() or any(embeds[i, n:].any() for i, n in enumerate(lengths)):
        raise ValueError("embeds must be zero past each prompt's length (as WanPipeline pads them)")
    padding = torch.arange(keep)[None] >= lengths_t[:, None]
    weight = torch.log((embeds.shape[1] - lengths_t).double() / (keep - lengths_t).double()).float()
    bias = torch.where(padding, weight[:, None], torch.zeros(()))
    return embeds[:, :keep], bias[:, None, None, :]


class PaddingWeight:
    """The cross-attention processor training uses with :func:`trim_padding`'s tokens: diffusers'
    ``WanAttnProcessor`` with :attr:`bias` (set before each step) as its mask, since the transformer
    block passes cross-attention none."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self._processor = WanAttnProcessor()
        self.bias: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("PaddingWeight supplies the cross-attention mask itself")
        return self._processor(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)

    def install(self, transformer: Any) -> PaddingWeight:
        for block in transformer.blocks:
            block.attn2.set_processor(self)
        return self


def token_counts(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Tokens per prompt as WanPipeline keeps them (``</s>`` included)."""
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]


def video_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1]."""
    return to_pixels(frames).transpose(1, 2)


def _load_vae(out: Path) -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(out / "vae").eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Stage 1: VAE


def _decode_unclamped(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` without its final clamp to [-1, 1] (which stops the gradient of every pixel that
    overshoots): the same causal decoder calls, one latent frame at a time."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def train_vae(out: Path, minutes: float, seed: int, batch: int = 4, frames: int = 9, shape_weight: float = 10.0,
              scale_clips: int = 32, max_steps: int | None = None, lr: float = 5e-4, init: Path | None = None,
              speed: float = SPEED, decoder_only: bool = False) -> None:
    """Train the autoencoder deterministically (the posterior's mode is decoded): sampled latents, with
    the posterior's initial unit variance, drowned the encoder's signal and the decoder learned the
    background only (a grey frame tinted by the clip's colour after 268 steps). 9-frame clips: the
    decoder's causal caches hold other frames in the third latent frame than in the second, and one
    trained on 5 frames only got the third one's colours wrong. ``init``: continue from that VAE folder.
    ``decoder_only`` (with ``init``): the encoder and its latent statistics stay as they are, so latents
    encoded with ``init`` (and a transformer trained on them) stay valid; only the decoder learns."""
    from diffusers import AutoencoderKLWan

    path = out / "vae"
    if (path / "config.json").exists():
        logger.info("vae: %s exists, skipping", path)
        return
    if decoder_only and init is None:
        raise ValueError("decoder_only: needs init, the VAE whose encoder is kept")
    vae = new_vae(seed) if init is None else AutoencoderKLWan.from_pretrained(init)
    vae.train()
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    logger.info("vae: %.2f M parameters (%.2f M trained), training %.1f min",
                sum(p.numel() for p in vae.parameters()) / 1e6, sum(p.numel() for p in trained) / 1e6, minutes)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    step, running, rows = 0, None, []
    while time.perf_counter() - start < minutes * 60 and (max_steps is None or step < max_steps):
        specs = [random_spec(rng, speed=speed) for _ in range(batch)]
        offsets = rng.integers(0, 16, size=batch)
        clips = np.stack([data.render(s, frames, int(t), trail=data.TRAIL) for s, t in zip(specs, offsets)])
        masks = np.stack([data.shape_mask(s, frames, int(t), trail=data.TRAIL) for s, t in zip(specs, offsets)])
        x = video_tensor(clips)
        m = torch.from_numpy(masks)[:, None]  # (B, 1, F, H, W)
        weight = 1.0 + (shape_weight - 1.0) * F.max_pool3d(m, (1, 3, 3), 1, (0, 1, 1))
        with torch.set_grad_enabled(not decoder_only):
            latents = vae.encode(x).latent_dist.mode()
        recon = _decode_unclamped(vae, latents)
        err = (recon - x) ** 2
        loss = (weight * err).mean()
        shape_error = float((err.detach() * m).sum() / (3 * m.sum()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0:
            logger.info("vae step %d  loss %.5f (shape pixels' squared error %.4f)  %.0f s", step, running, shape_error,
                        time.perf_counter() - start)
            rows.append((step, round(time.perf_counter() - start, 1), running))
    vae.eval()
    with torch.no_grad():
        rng = np.random.default_rng(seed + 1)
        x = video_tensor(np.stack([data.render(random_spec(rng, speed=speed), frames, trail=data.TRAIL)
                                   for _ in range(scale_clips)]))
        latents = vae.encode(x).latent_dist.mode()
        mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
        err = float((vae.decode(latents).sample - x).abs().mean() * 127.5)
    if not decoder_only:  # else the encoder's latents are unchanged: keep the statistics they were normalised by
        vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                               latents_std=[round(float(v), 5) for v in std])
    logger.info("vae: %d steps, latent mean %s std %s, mean abs error %.2f / 255", step,
                [round(float(v), 3) for v in mean], [round(float(v), 3) for v in std], err)
    tmp = out / ".vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    with open(out / "vae_loss.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("step", "seconds", "loss"), *rows])
    install_folder(tmp, path)


# --------------------------------------------------------------------------------------------------
# Stage 2: training clips as normalised latents


def encode_clips(out: Path, clips_per_class: int, seed: int, frames: int = CLIP_FRAMES, speed: float = SPEED) -> None:
    """Encode ``clips_per_class`` clips of every class moving ``speed`` pixels a frame (``starts``: each
    clip's object centre in frame 0, pixels, for the counterfactual targets)."""
    path = out / "latents.pt"
    if path.exists():
        stored = clip_speed(torch.load(path))
        if stored != speed:
            raise SystemExit(f"{path} holds clips moving {stored:g} px a frame, not --speed {speed:g}: "
                             f"use another --out, or pass --speed {stored:g}")
        logger.info("latents: %s exists, skipping", path)
        return
    from ..families.wan.vae import normalize_wan_latents

    vae = _load_vae(out)
    rng = np.random.default_rng(seed + 2)
    classes = data.all_classes()
    latents, labels, starts = [], [], []
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(clips_per_class):
            specs = [random_spec(rng, [c], speed) for c in classes]
            starts.extend((spec.x0, spec.y0) for spec in specs)
            for first in range(0, len(specs), 12):
                group = specs[first:first + 12]
                x = video_tensor(np.stack([data.render(s, frames, trail=data.TRAIL) for s in group]))
                z = normalize_wan_latents(vae, vae.encode(x).latent_dist.mode())
                latents.extend(z.to(torch.float16))
            labels.extend(range(len(classes)))
            logger.info("latents: %d/%d clips per class, %.0f s", k + 1, clips_per_class, time.perf_counter() - start)
    save_atomic({"latents": torch.stack(latents), "labels": torch.tensor(labels), "classes": classes,
                 "starts": torch.tensor(starts), "speed": speed}, path)
    logger.info("latents: %d clips in %.0f s", len(labels), time.perf_counter() - start)


def clip_speed(clips: dict[str, Any]) -> float:
    """Pixels a frame of stored training clips (those written before the speed was stored: data.SPEED)."""
    return float(clips.get("speed", data.SPEED))


# --------------------------------------------------------------------------------------------------
# Stage 3: transformer


def shifted_sigmas(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Noise levels as the flow scheduler spaces them: uniform ``u`` pushed towards 1 by ``shift``."""
    return shift * u / (1 + (shift - 1) * u)


def components(out: Path, transformer: Any, seed: int) -> dict[str, Any]:
    """The pipeline's components around ``transformer`` (tokenizer, frozen text encoder, VAE, scheduler)."""
    tokenizer = new_tokenizer()
    return {"tokenizer": tokenizer, "text_encoder": new_text_encoder(tokenizer, seed), "transformer": transformer,
            "vae": _load_vae(out), "scheduler": new_scheduler()}


def sample(parts: dict[str, Any], prompts: list[str], frames: int = 17, steps: int = 20, guidance: float = 5.0,
           seed: int = 0) -> np.ndarray:
    """Single-process samples made by the package's pipeline: uint8 (len(prompts), F, H, W, 3)."""
    from diffusers import WanPipeline

    from ..pipeline import VideoInfinityPipeline

    pipe = VideoInfinityPipeline.from_pipe(WanPipeline(**parts), WHOLE_WINDOW_ENGINE)
    videos = []
    for i, prompt in enumerate(prompts):
        video = pipe(prompt, num_frames=frames, height=data.SIZE, width=data.SIZE, num_inference_steps=steps,
                     guidance_scale=guidance, seed=seed + i, progress=False).frames[0]
        videos.append((video * 255).round().astype(np.uint8))
    return np.stack(videos)


def evaluate_quick(parts: dict[str, Any], seed: int) -> dict[str, Any]:
    from .probe import analyse

    prompts = [data.caption(*c) for c in EVAL_PROMPTS]
    videos = sample(parts, prompts, seed=seed)
    reports = [analyse(v) for v in videos]
    found = [f"{r.colour}/{r.direction}" for r in reports]
    return {"colour": float(np.mean([r.colour == c for r, (c, _s, _d) in zip(reports, EVAL_PROMPTS)])),
            "direction": float(np.mean([r.direction == d for r, (_c, _s, d) in zip(reports, EVAL_PROMPTS)])),
            "found": found, "videos": videos}


def clip_starts(seed: int, clips: int) -> torch.Tensor:
    """The frame-0 object centres (pixels) of the first ``clips`` clips :func:`encode_clips` draws with
    ``seed`` (for latents written before it stored them: the same random draws, replayed)."""
    rng = np.random.default_rng(seed + 2)
    classes = data.all_classes()
    starts: list[tuple[float, float]] = []
    while len(starts) < clips:
        starts.extend((s.x0, s.y0) for s in (data.random_spec(rng, [c]) for c in classes))
    return torch.tensor(starts[:clips])


def meeting_roll(frame: int, start: torch.Tensor, velocity: torch.Tensor, other_start: torch.Tensor,
                 other_velocity: torch.Tensor, latent_pixel: float) -> tuple[int, int]:
    """(dy, dx) latent pixels to roll the other clip by so that its object sits where this clip's is in
    video ``frame`` (centres and velocities (x, y) in pixels and pixels per frame; wrapped the short way)."""
    offset = (start + velocity * frame) - (other_start + other_velocity * frame)
    offset = (offset + data.SIZE / 2) % data.SIZE - data.SIZE / 2
    dx, dy = (offset / latent_pixel).round().long().tolist()
    return dy, dx


def lr_factor(step: int, elapsed_s: float, minutes: float, decay_minutes: float, warmup: int = 200) -> float:
    """The learning rate's share at ``step``, ``elapsed_s`` seconds into a run of ``minutes``: rising
    over ``warmup`` steps, then constant, then falling linearly to zero over the run's last
    ``decay_minutes`` (wall time, as the run's length is; none when 0)."""
    factor = min(1.0, (step + 1) / warmup)
    if decay_minutes > 0:
        factor = min(factor, max(0.0, (minutes * 60 - elapsed_s) / (decay_minutes * 60)))
    return factor


def _checkpoint(out: Path) -> Path:
    return out / "checkpoint.pt"


def train_transformer(out: Path, minutes: float, seed: int, resume: bool, batch: int = 8, lr: float = 3e-4,
                      ema_decay: float = 0.999, checkpoint_minutes: float = 5.0, eval_minutes: float = 20.0,
                      max_steps: int | None = None, windows: tuple[int, ...] = WINDOWS, window_start: str = "any",
                      counterfactual: float = 0.0,
                      counterfactual_sigma: float = 0.85, init: Path | None = None, decay_minutes: float = 0.0) -> None:
    """Flow-matching training. ``decay_minutes``: the learning rate falls to zero over this run's last
    so many minutes (:func:`lr_factor`). ``counterfactual``: the share of captioned samples at noise
    level sigma >= ``counterfactual_sigma`` whose caption's direction is drawn anew, a clip of that class
    rolled to meet the sample's object at the window's first frame being the target (so that there the
    prompt, not the faint motion left in the noise, chooses the direction: what taught the UNet3D demo
    the direction; see ``demo/weights/README.md``)."""
    clips = torch.load(out / "latents.pt")
    latents_all, labels_all = clips["latents"], clips["labels"]
    classes = [tuple(c) for c in clips["classes"]]
    starts = clips.get("starts")
    if starts is None:
        starts = clip_starts(seed, len(labels_all))
    class_index = {c: i for i, c in enumerate(classes)}
    members = [torch.nonzero(labels_all == i).flatten() for i in range(len(classes))]
    partner = torch.tensor([[class_index[(c, sh, d)] for d in data.DIRECTIONS] for c, sh, _d in classes])
    speed = clip_speed(clips)
    velocity = torch.tensor([data.DIRECTIONS[d] for _c, _s, d in classes]) * speed  # (x, y) px a frame
    latent_pixel = data.SIZE / latents_all.shape[-1]
    tokenizer = new_tokenizer()
    text_encoder = new_text_encoder(tokenizer, seed)
    captions = [data.caption(*c) for c in classes]
    text, text_bias = trim_padding(encode_prompts(tokenizer, text_encoder, captions), token_counts(tokenizer, captions))
    empty, empty_bias = (t[0] for t in trim_padding(encode_prompts(tokenizer, text_encoder, [""]),
                                                     token_counts(tokenizer, [""])))
    clip_frames = latents_all.shape[2]
    windows = tuple(min(w, clip_frames) for w in windows)

    transformer = new_transformer(seed).train()
    ema = Ema({"transformer": transformer}, ema_decay)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    step, trained_seconds = 0, 0.0
    gen = torch.Generator().manual_seed(seed)
    if resume and _checkpoint(out).exists():
        state = torch.load(_checkpoint(out), weights_only=False)
        if state.get("config") != json.loads(json.dumps(TRANSFORMER_CONFIG)):
            raise SystemExit(f"{_checkpoint(out)} holds another transformer configuration")
        transformer.load_state_dict(state["transformer"])
        ema.shadow["transformer"].load_state_dict(state["ema_transformer"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, trained_seconds = state["step"], state["trained_seconds"]
        logger.info("transformer: resumed at step %d (%.1f min trained)", step, trained_seconds / 60)
    elif _checkpoint(out).exists():
        raise SystemExit(f"{_checkpoint(out)} exists: pass --resume to continue it, or use another --out")
    elif init is not None:  # an exported model (its EMA weights) to continue from, with a fresh optimiser
        from diffusers import WanTransformer3DModel

        weights = WanTransformer3DModel.from_pretrained(Path(init) / "transformer").state_dict()
        transformer.load_state_dict(weights)
        ema.shadow["transformer"].load_state_dict(weights)
        record = Path(init) / "training.json"
        if record.exists():
            done = json.loads(record.read_text())
            step, trained_seconds = done["step"], done["trained_seconds"]
        logger.info("transformer: starting from %s (step %d, %.1f min trained)", init, step, trained_seconds / 60)
    padding_weight = PaddingWeight().install(transformer)  # after the EMA's copy: exported weights see 512 tokens
    logger.info("transformer: %.2f M parameters, %d clips of %d latent frames moving %g px a frame, windows %s "
                "starting at %s latent frame, lr %g (falling to 0 over the last %g min), %.1f min",
                sum(p.numel() for p in transformer.parameters()) / 1e6, len(labels_all), clip_frames, speed, windows,
                "the first" if window_start == "first" else "any", lr, decay_minutes, minutes)

    def save() -> None:
        save_atomic({"transformer": transformer.state_dict(), "ema_transformer": ema.shadow["transformer"].state_dict(),
                     "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step,
                     "trained_seconds": trained_seconds, "config": json.loads(json.dumps(TRANSFORMER_CONFIG))},
                    _checkpoint(out))
        logger.info("transformer: checkpoint at step %d", step)

    loss_log = LossLog(out)
    session_start = last_ckpt = last_eval = time.perf_counter()
    window_loss: list[float] = []
    try:
        while time.perf_counter() - session_start < minutes * 60 and (max_steps is None or step < max_steps):
            if (out / "STOP").exists():
                logger.info("transformer: %s found, stopping", out / "STOP")
                break
            t0 = time.perf_counter()
            window = windows[step % len(windows)]
            idx = torch.randint(len(labels_all), (batch,), generator=gen)
            first = int(torch.randint(0, clip_frames - window + 1, (1,), generator=gen))
            if window_start == "first":  # drawn all the same: one random stream for both
                first = 0
            shifts = torch.randint(0, latents_all.shape[-1], (batch, 2), generator=gen)
            x0 = latents_all[idx, :, first:first + window].float()
            x0 = torch.stack([torch.roll(c, (int(a), int(b)), dims=(-2, -1)) for c, (a, b) in zip(x0, shifts)])
            noise = torch.randn(x0.shape, generator=gen)
            sigma = shifted_sigmas(torch.rand(batch, generator=gen))
            drop = torch.rand(batch, generator=gen) < 0.1
            s = sigma.view(-1, 1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            target = noise - x0
            label = labels_all[idx].clone()
            if counterfactual > 0:
                swap = (torch.rand(batch, generator=gen) < counterfactual) & (sigma >= counterfactual_sigma) & ~drop
                new_direction = torch.randint(0, len(data.DIRECTIONS), (batch,), generator=gen)
                pick = torch.randint(0, 1 << 30, (batch,), generator=gen)
                frame = 0 if first == 0 else 4 * first - 3  # the window's first latent frame's first video frame
                for b in torch.nonzero(swap).flatten().tolist():
                    other_class = int(partner[label[b], new_direction[b]])
                    j = int(members[other_class][pick[b] % len(members[other_class])])
                    dy, dx = meeting_roll(frame, starts[idx[b]], velocity[label[b]], starts[j], velocity[other_class],
                                          latent_pixel)
                    other = torch.roll(latents_all[j, :, first:first + window].float(),
                                       (dy + int(shifts[b, 0]), dx + int(shifts[b, 1])), dims=(-2, -1))
                    target[b] = (noisy[b] - other) / sigma[b]  # the velocity from noisy[b] towards the other clip
                    label[b] = other_class
            context = torch.where(drop[:, None, None], empty[None], text[label])
            padding_weight.bias = torch.where(drop[:, None, None, None], empty_bias[None], text_bias[label])
            pred = transformer(noisy, timestep=sigma * 1000, encoder_hidden_states=context, return_dict=False)[0]
            loss = F.mse_loss(pred, target)
            current_lr = lr * lr_factor(step, time.perf_counter() - session_start, minutes, decay_minutes)
            for group in opt.param_groups:
                group["lr"] = current_lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            opt.step()
            step += 1
            ema.update({"transformer": transformer}, step)
            trained_seconds += time.perf_counter() - t0
            window_loss.append(loss.item())
            if step % 25 == 0:
                loss_log.row(step, trained_seconds, float(np.mean(window_loss)), current_lr)
                logger.info("transformer step %d  loss %.4f  %.2f s/step  %.1f min trained", step,
                            np.mean(window_loss), time.perf_counter() - t0, trained_seconds / 60)
                window_loss.clear()
            now = time.perf_counter()
            if now - last_ckpt > checkpoint_minutes * 60:
                save()
                last_ckpt = now
            if eval_minutes > 0 and now - last_eval > eval_minutes * 60:
                result = evaluate_quick(components(out, ema.shadow["transformer"], seed), seed)
                record_eval(out, "transformer", step, trained_seconds, result)
                last_eval = time.perf_counter()
    finally:
        save()
        loss_log.close()


# --------------------------------------------------------------------------------------------------
# Stage 4: export


def export(out: Path, target: Path, seed: int = 0) -> Path:
    """Write the EMA weights as a ``WanPipeline`` folder at ``target`` (replaced atomically)."""
    from diffusers import WanPipeline

    state = torch.load(_checkpoint(out), weights_only=False, map_location="cpu")
    transformer = new_transformer(0)
    transformer.load_state_dict(state["ema_transformer"])
    pipe = WanPipeline(**components(out, transformer.eval(), seed))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(
            {"step": state["step"], "trained_seconds": round(state["trained_seconds"], 1)}, indent=2) + "\n")
        (tmp / "README.md").write_text(
            "Tiny Wan-architecture demo model trained by `python -m video_infinity.demo.train --family wan` on "
            "procedural videos (one coloured circle, square or triangle moving right, left, up or down on a grey "
            f"background; prompts like \"a red circle moving right\"). EMA weights after {state['step']} steps "
            f"({state['trained_seconds'] / 60:.0f} min of transformer steps).\n")
        install_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    logger.info("exported step %s to %s (%.1f MB)", state["step"], target, size / 1e6)
    return target


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m video_infinity.demo.train --family wan",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="work folder (checkpoints, logs, samples)")
    parser.add_argument("--stage", choices=("all", "vae", "latents", "transformer", "export"), default="all")
    parser.add_argument("--resume", action="store_true", help="continue the transformer from out/checkpoint.pt")
    parser.add_argument("--minutes", type=float, default=90.0, help="transformer training time for this run")
    parser.add_argument("--max-steps", type=int, default=None, help="transformer steps (in all, resumed ones included)")
    parser.add_argument("--vae-minutes", type=float, default=12.0)
    parser.add_argument("--vae-max-steps", type=int, default=None)
    parser.add_argument("--vae-scale-clips", type=int, default=32)
    parser.add_argument("--vae-init", type=Path, default=None, help="continue training this VAE folder")
    parser.add_argument("--vae-frames", type=int, default=9, help="frames per VAE training clip (1 + 4k)")
    parser.add_argument("--vae-decoder-only", action="store_true",
                        help="with --vae-init: train the decoder only (the encoder, its latents and their statistics "
                             "stay valid, so a transformer trained on them does too)")
    parser.add_argument("--clips-per-class", type=int, default=24)
    parser.add_argument("--speed", type=float, default=SPEED,
                        help=f"pixels a frame the shapes move in the VAE's and the transformer's clips (default {SPEED:g})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--decay-minutes", type=float, default=0.0,
                        help="let the learning rate fall linearly to zero over this run's last so many minutes")
    parser.add_argument("--window-start", choices=WINDOW_STARTS, default="any",
                        help="where a training window starts in its clip: any latent frame, or the first")
    parser.add_argument("--counterfactual", type=float, default=0.0,
                        help="share of captioned samples at sigma >= --counterfactual-sigma given another direction's "
                             "caption and, as the target, a clip moving that way from where the object is")
    parser.add_argument("--counterfactual-sigma", type=float, default=0.85)
    parser.add_argument("--init", type=Path, default=None,
                        help="start the transformer from this exported model folder (e.g. the shipped weights_wan); "
                             "with --vae-init FOLDER/vae the whole model continues")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--eval-minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export", type=Path, default=None, help="write the EMA model as a WanPipeline folder here")
    args = parser.parse_args(argv)
    if args.vae_decoder_only and args.vae_init is None:
        parser.error("--vae-decoder-only: needs --vae-init FOLDER, the VAE whose encoder is kept")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    signal.signal(signal.SIGTERM, _terminate)  # checkpoint on `kill PID` too
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "vae"):
        train_vae(args.out, args.vae_minutes, args.seed, scale_clips=args.vae_scale_clips, max_steps=args.vae_max_steps,
                  init=args.vae_init, frames=args.vae_frames, speed=args.speed, decoder_only=args.vae_decoder_only)
    if args.stage in ("all", "latents"):
        encode_clips(args.out, args.clips_per_class, args.seed, speed=args.speed)
    if args.stage in ("all", "transformer"):
        train_transformer(args.out, args.minutes, args.seed, args.resume, batch=args.batch, lr=args.lr,
                          ema_decay=args.ema_decay, checkpoint_minutes=args.checkpoint_minutes,
                          eval_minutes=args.eval_minutes, max_steps=args.max_steps,
                          window_start=args.window_start, counterfactual=args.counterfactual,
                          counterfactual_sigma=args.counterfactual_sigma,
                          init=args.init, decay_minutes=args.decay_minutes)
    if args.export is not None and args.stage in ("all", "export"):
        export(args.out, args.export, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
