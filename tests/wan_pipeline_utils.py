"""A tiny random Wan text-to-video folder (transformer, AutoencoderKLWan, UMT5 encoder, a word-level
tokenizer written locally, UniPC scheduler with flow_shift) saved with diffusers' WanPipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from wan_utils import TEXT_DIM, build_tiny_wan_transformer

WORDS = "a cat dog runs jumps on the beach in snow at night red blue sky".split()


def build_tiny_wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """Wan2.1's VAE layout at toy width: 4 latent channels, 8x spatial and 4x temporal compression."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_wan_folder(path: Path, seed: int = 0, two_experts: bool = False) -> Path:
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8)).eval()
    pipe = WanPipeline(
        tokenizer=build_tiny_tokenizer(),
        text_encoder=encoder,
        transformer=build_tiny_wan_transformer(seed),
        vae=build_tiny_wan_vae(seed),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer_2=build_tiny_wan_transformer(seed + 1) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
    )
    pipe.save_pretrained(path)
    return Path(path)
