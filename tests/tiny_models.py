"""The one builder module of the tests: tiny random models of every family, saved to disk.

Model folders (what the pipeline loads): ``build_unet3d_folder`` (TextToVideoSDPipeline),
``build_animatediff_folder`` (AnimateDiffPipeline, or an SD base + a MotionAdapter),
``build_tiny_wan_folder`` (WanPipeline, optionally with a second expert), ``build_tiny_wan_i2v_folder``
(WanImageToVideoPipeline in its four modes). Denoisers alone:
``build_tiny_unet`` (UNet3DConditionModel), ``build_tiny_motion_unet`` (UNetMotionModel),
``build_tiny_wan_transformer`` (WanTransformer3DModel), and ``TemporalStack`` (one temporal
transformer with sinusoidal positions). Every weight is random and sizeable (diffusers starts some
at zero), so every temporal path changes the output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, UNet3DConditionModel, UNetMotionModel, UniPCMultistepScheduler,
                       WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, UMT5Config,
                          UMT5EncoderModel)

from video_infinity.demo.random_animatediff import build_random_animatediff, random_motion_unet_parts
from video_infinity.demo.random_model import build_random_model

CROSS_ATTENTION_DIM = 16
"""The text width of ``build_tiny_unet`` and ``build_tiny_motion_unet``."""
TEXT_DIM = 16
"""The text width of the tiny Wan transformer."""


# ---------------------------------------------------------------- pipeline folders
def build_unet3d_folder(path: Path, seed: int = 0) -> Path:
    """A complete TextToVideoSDPipeline folder (the demo's random model layout)."""
    return Path(build_random_model(path, seed=seed))


def build_animatediff_folder(path: Path, seed: int = 3, layout: str = "pipeline") -> Path:
    """An AnimateDiffPipeline folder (``layout="pipeline"``) or ``path/base`` + ``path/motion_adapter``."""
    return Path(build_random_animatediff(path, seed=seed, layout=layout))


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


def build_tiny_text_encoder() -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8)).eval()


def flow_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def build_tiny_wan_folder(path: Path, seed: int = 0, two_experts: bool = False, ffn_dim: int = 32) -> Path:
    """A WanPipeline folder: transformer (and transformer_2), AutoencoderKLWan, UMT5, a word-level tokenizer."""
    torch.manual_seed(seed)
    encoder = build_tiny_text_encoder()
    pipe = WanPipeline(
        tokenizer=build_tiny_tokenizer(),
        text_encoder=encoder,
        transformer=build_tiny_wan_transformer(seed, ffn_dim=ffn_dim),
        vae=build_tiny_wan_vae(seed),
        scheduler=flow_scheduler(),
        transformer_2=build_tiny_wan_transformer(seed + 1, ffn_dim=ffn_dim) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
    )
    pipe.save_pretrained(path)
    return Path(path)


I2V_MODES = ("i2v", "flf", "a14b", "ti2v")
"""WanImageToVideoPipeline's modes: Wan2.1 I2V (CLIP), first-last-frame (CLIP, two images' position
embedding), Wan2.2 A14B I2V (two experts, no CLIP), Wan2.2 TI2V (``expand_timesteps``)."""
CLIP_IMAGE_SIZE, CLIP_PATCH, CLIP_WIDTH = 16, 4, 8


def build_tiny_wan_i2v_pipeline(mode: str, seed: int = 0) -> WanImageToVideoPipeline:
    """A tiny ``WanImageToVideoPipeline`` in ``mode`` (one of :data:`I2V_MODES`), every weight random."""
    torch.manual_seed(seed)
    vae = build_tiny_wan_vae(seed)
    z_dim = vae.config.z_dim
    clip = mode in ("i2v", "flf")
    image_tokens = (CLIP_IMAGE_SIZE // CLIP_PATCH) ** 2 + 1
    extra = dict(image_dim=CLIP_WIDTH, added_kv_proj_dim=24) if clip else {}
    if mode == "flf":
        extra["pos_embed_seq_len"] = 2 * image_tokens

    def transformer(offset: int) -> WanTransformer3DModel:
        torch.manual_seed(seed + offset)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=z_dim if mode == "ti2v" else 2 * z_dim + vae.config.scale_factor_temporal,
            out_channels=z_dim, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra,
        ).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        return model

    encoder = None
    if clip:
        encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                                   image_size=CLIP_IMAGE_SIZE, intermediate_size=16,
                                                   patch_size=CLIP_PATCH, projection_dim=CLIP_WIDTH)).eval()
    return WanImageToVideoPipeline(
        tokenizer=build_tiny_tokenizer(), text_encoder=build_tiny_text_encoder(), vae=vae, scheduler=flow_scheduler(),
        image_processor=CLIPImageProcessor(crop_size=CLIP_IMAGE_SIZE, size=CLIP_IMAGE_SIZE) if clip else None,
        image_encoder=encoder, transformer=transformer(1), transformer_2=transformer(2) if mode == "a14b" else None,
        boundary_ratio=0.5 if mode == "a14b" else None, expand_timesteps=mode == "ti2v",
    )


def build_tiny_wan_i2v_folder(path: Path, mode: str, seed: int = 0) -> Path:
    """:func:`build_tiny_wan_i2v_pipeline` saved with ``save_pretrained``."""
    build_tiny_wan_i2v_pipeline(mode, seed).save_pretrained(path)
    return Path(path)


# ---------------------------------------------------------------- denoisers alone
def build_tiny_unet(path: Path, seed: int = 0) -> Path:
    """Random tiny UNet3DConditionModel saved with save_pretrained. Every weight is random (the
    zero-initialised last temporal conv included), so every temporal path changes the output."""
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    unet.save_pretrained(path)
    return path


def load_unet(path: Path) -> UNet3DConditionModel:
    return UNet3DConditionModel.from_pretrained(path).eval()


def build_tiny_motion_unet(path: Path, seed: int = 0, **sizes: object) -> Path:
    """A random tiny UNetMotionModel built the way real ones are (``from_unet2d``), saved with
    save_pretrained. Every weight is random and sizeable, so every temporal path changes the output.
    ``sizes`` go to :func:`random_motion_unet_parts` (channels, groups, heads)."""
    unet2d, adapter = random_motion_unet_parts(seed, cross_attention_dim=CROSS_ATTENTION_DIM, **sizes)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    unet.save_pretrained(path)
    return path


def load_motion_unet(path: Path) -> UNetMotionModel:
    return UNetMotionModel.from_pretrained(path).eval()


def build_tiny_wan_transformer(seed: int = 0, rope_max_seq_len: int = 32, in_channels: int = 4,
                               ffn_dim: int = 32) -> WanTransformer3DModel:
    """2 layers, 2 heads of 12 channels. Every weight random (diffusers starts some at zero), so every path matters."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=rope_max_seq_len,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def save_tiny_wan_transformer(path: Path, seed: int = 0, ffn_dim: int = 32) -> Path:
    build_tiny_wan_transformer(seed, ffn_dim=ffn_dim).save_pretrained(path)
    return path


class TemporalStack(torch.nn.Module):
    """A UNet-shaped wrapper around one TransformerTemporalModel with sinusoidal frame positions
    (as AnimateDiff-style motion modules have): checks that positions are global frame indices."""

    def __init__(self, channels: int = 8, seed: int = 0) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

        torch.manual_seed(seed)
        self.temporal = TransformerTemporalModel(
            num_attention_heads=2, attention_head_dim=4, in_channels=channels, norm_num_groups=4,
            positional_embeddings="sinusoidal", num_positional_embeddings=64,
        ).eval()
        with torch.no_grad():
            for p in self.temporal.parameters():
                p.copy_(torch.randn_like(p) * 0.3)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None):
        batch, channels, frames, height, width = sample.shape
        flat = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        out = self.temporal(flat, num_frames=frames, return_dict=False)[0]
        return type("Output", (), {"sample": out.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)})
