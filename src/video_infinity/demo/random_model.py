"""A complete, tiny text-to-video pipeline folder with random weights, for tests and smoke runs.

The folder has the layout of a real diffusers ``TextToVideoSDPipeline`` (ZeroScope-like) and is
loaded through the same code as real checkpoints (:func:`video_infinity.families.unet3d.model.load_model`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..families.unet3d.model import FpsUNet3DConditionModel

logger = logging.getLogger(__name__)

MAX_LENGTH = 77

# Whole-word tokens: common English plus the demo's captions (colours, shapes, motions). Letters
# only: CLIP's pre-tokenizer splits at hyphens and digits anyway.
_WORDS = """
a an the of and or in on at to from by with without for as is are was were be been being it its this
that these those there here he she they we you i me my your our their his her him them who what which
when where why how not no yes all any some many much more most few other such only own same so than
too very can will just do does did done have has had make made get got go goes going went come came
see seen look looks looking take took give gave find found think know want use used work day night
time year way thing man woman child children people person world life hand part place case week
point home water room mother father area money story fact month lot right left up down over under
above below around through into out off again then once before after while during between
red green blue yellow orange purple pink brown black white gray grey gold silver dark light bright
colorful colourful circle square triangle star heart shape shapes object ball box cube dot line
moving moves move moved running runs run walking walks walk flying flies fly jumping jumps jump
swimming swims swim rolling rolls roll spinning spins spin falling falls fall rising rises rise
slowly quickly fast slow big small large little tiny huge tall short long wide round flat
background foreground plain textured texture pattern stripes checkered sky sea ocean beach river
lake mountain mountains forest tree trees flower flowers grass field road street city town house
building car cars train boat ship plane bird birds dog dogs cat cats horse fish bear lion tiger
sun moon stars cloud clouds rain snow fire smoke wind storm sunset sunrise morning evening
beautiful cinematic realistic detailed high quality video footage scene shot view camera close
drone aerial panning zoom timelapse motion animation cartoon painting style photo
astronaut robot riding horseback dancing playing eating drinking sitting standing sleeping
wave waves underwater space galaxy planet earth snowy sunny rainy cloudy foggy
""".split()


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode mapping (index = byte value)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return [chr(mapping[b]) for b in range(256)]


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's format: every byte (so any text tokenises), plus merges
    learnt by a small BPE training run over ``_WORDS`` until each of them is a single token."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    # Real BPE training, not one merge chain per word: the encoder applies merges by rank across
    # the whole word, so hand-made chains of different words would cut each other's words apart.
    words = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(_WORDS)]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        best = max(counts, key=lambda pair: (counts[pair], pair))  # ties broken deterministically
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = [_merge(word, best) if len(word) > 1 else word for word in words]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    # ZeroScope's layout (vocab.json + merges.txt + configs), written by hand: transformers 5.x's
    # save_pretrained would write only tokenizer.json, which transformers 4.x cannot read.
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
         "do_lower_case": True, "errors": "replace", "add_prefix_space": False},
    )


def _wake_zero_layers(model: torch.nn.Module) -> None:
    """Re-initialise layers that diffusers zero-initialises (TemporalConvLayer.conv4's last conv),
    so that a random model's temporal layers actually mix frames, as a trained model's do."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear)) and weight is not None:
            if not torch.any(weight):
                module.reset_parameters()
                weight.data.mul_(0.5)  # a residual branch: keep it from dominating the identity


def _unet(seed: int, fps_cond: bool, sample_size: int) -> UNet3DConditionModel:
    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(seed)
    unet = FpsUNet3DConditionModel(**config, fps_cond=True) if fps_cond else UNet3DConditionModel(**config)
    _wake_zero_layers(unet)
    if fps_cond:
        # Make fps matter as much as the timestep does (default init gives a weak embedding).
        torch.nn.init.normal_(unet.fps_embedding.linear_1.weight, std=0.5)
    return unet


def _vae(seed: int, sample_size: int) -> AutoencoderKL:
    torch.manual_seed(seed + 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplers: latents are height / 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 8,
    )


def _text_encoder(seed: int, vocab: dict[str, int]) -> CLIPTextModel:
    torch.manual_seed(seed + 2)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config)


SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}


def build_random_model(path: str | Path, seed: int = 0, fps_cond: bool = False, sample_size: int = 8) -> Path:
    """Write a complete tiny pipeline folder (random weights) to ``path`` and return it.

    ``fps_cond`` makes the UNet a VideoCrafter2-style :class:`FpsUNet3DConditionModel`;
    ``sample_size`` is the UNet's latent size (the VAE's image size is 8x that).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        models = {
            "unet": _unet(seed, fps_cond, sample_size),
            "vae": _vae(seed, sample_size),
            "text_encoder": _text_encoder(seed, vocab),
        }
    for name, model in models.items():
        # float16 on disk keeps the folder under 2 MB; loaders cast to whatever dtype they ask for.
        # (plain Module.to: diffusers' own .to() warns about fp32-only modules these models lack)
        torch.nn.Module.to(model, torch.float16).save_pretrained(path / name)
    _write_tokenizer(path / "tokenizer", vocab, merges)
    _write_json(path / "scheduler" / "scheduler_config.json",
                {**SCHEDULER_CONFIG, "_diffusers_version": diffusers.__version__})
    _write_json(path / "model_index.json", {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": diffusers.__version__,
        # The loader picks the UNet class from unet/config.json (fps_cond), not from here.
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    })
    logger.info("wrote a random tiny model (fps_cond=%s) to %s", fps_cond, path)
    return path
