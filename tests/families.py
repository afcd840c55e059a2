"""The model families the conformance suite (``test_conformance.py``) runs: one ``FamilySpec`` each.

A new family joins the suite with one entry in ``FAMILIES``: how to build its tiny random model
folder, its own diffusers pipeline (the reference), the calls to make (frames, size, sampler, engine
settings) and what it supports (loops). Everything else is the suite's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tiny_models import build_animatediff_folder, build_tiny_wan_folder, build_tiny_wan_i2v_folder, build_unet3d_folder

WHOLE_WINDOW = {"attn": {"padding": 1000, "top_k": 0, "local_phase": None, "global_phase": None}}
"""A window covering the whole video, no global frames, no phase biases: the unmodified model."""

PHASES = {"local_phase": {"t": 600, "local_biase": 1.5, "global_biase": -0.5},
          "global_phase": {"t": 400, "local_biase": -0.3, "global_biase": 2.0}}
"""Both phases active along a 2-step schedule (t = 999 and about 500)."""


@dataclass(frozen=True)
class FamilySpec:
    """What the suite needs to know of a family. Frame counts are the whole video's frames as a user
    gives them (``num_frames``); ``latent_frames`` turns them into the engine's."""

    name: str
    build: Callable[[Path], Path]
    """Writes the tiny random model folder under the given path; returns the folder."""
    reference: Callable[[Path], Any]
    """The family's own diffusers pipeline loaded from that folder (float32, CPU)."""
    latent_frames: Callable[[int], int]
    """Latent frames of a video of n frames (what the ranks split)."""
    parity_call: dict[str, Any]
    """Arguments of the whole-window parity run (ours and diffusers' alike): prompt, frames, size, steps."""
    parity_schedulers: tuple[str | None, ...]
    """diffusers scheduler classes the parity runs use, built from the folder's scheduler config
    (``None``: the folder's own scheduler)."""
    size: dict[str, int]
    """height and width of the distributed runs."""
    prompt: Any
    """The distributed runs' prompt (per-frame prompts where the family has them)."""
    num_frames: int
    """Frames of the distributed runs: uneven clips on 2, 3 and 4 ranks."""
    engine: dict[str, Any]
    """Non-trivial engine settings (windows, global frames, phase biases) of the distributed runs."""
    scheduler: str
    """The distributed runs' sampler (a stochastic one where the family has one: per-frame noise)."""
    steps: int = 2
    guidance_scale: float = 4.0
    loop_cases: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """Seamless loops: name -> (num_frames, engine settings with loop on); empty: no loops. Cases
    without global frames must be roll-equivariant; every case must be rank-invariant."""
    loop_scheduler: str = "ddim"
    """A deterministic sampler for the loops (a stochastic one's noise is tied to frame indices)."""
    whole_window: dict[str, Any] = field(default_factory=lambda: WHOLE_WINDOW)
    parity_atol: float = 1e-4
    decode_atol: float = 0.0
    """Decoded frames of N ranks against one process (0: bit for bit)."""
    memory_frames: tuple[int, int, int] = (4, 8, 16)
    """Latent frames F, 2F, 4F of the peak-memory check (one model call on one process)."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """Keywords every call adds, ours and diffusers' alike (image-to-video: ``image``, ``last_image``)."""
    loops_roll: bool = True
    """Whether rolling a loop's frames rolls its video (not when an image holds frame 0 in place)."""
    loop_ends: tuple[int, int] = (0, -1)
    """The latent frames nearest the video's ends that the loop must change (not an image's own)."""
    checkpoint: bool = True
    """Whether the checkpoint test runs it (one image-to-video mode stands for the others: their
    conditioning is recomputed the same way on resume)."""

    def __str__(self) -> str:
        return self.name


def _text_to_video_sd(folder: Path) -> Any:
    from diffusers import TextToVideoSDPipeline

    return TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=torch.float32)


def _animatediff(folder: Path) -> Any:
    from diffusers import AnimateDiffPipeline

    return AnimateDiffPipeline.from_pretrained(folder)


def _wan(folder: Path) -> Any:
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(folder)


def _wan_i2v(folder: Path) -> Any:
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(folder)


def sample_image(seed: int, width: int = 40, height: int = 24) -> Any:
    """A random RGB PIL image (another size than the videos': the pipelines resize it)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _wan_latent_frames(num_frames: int) -> int:
    from video_infinity.families.wan.vae import latent_frame_count

    return latent_frame_count(num_frames)


DUAL_SCOPE = {"attn": {"padding": 2, "top_k": 3, "token_num_scale": True, **PHASES}}

UNET3D = FamilySpec(
    name="unet3d",
    build=build_unet3d_folder,
    reference=_text_to_video_sd,
    latent_frames=lambda n: n,
    parity_call=dict(prompt="a red circle moving right", negative_prompt="blurry", num_frames=6, height=32, width=40,
                     num_inference_steps=3, guidance_scale=4.0),
    parity_schedulers=("DDIMScheduler", "DPMSolverMultistepScheduler"),
    size=dict(height=32, width=40),
    prompt={0: "a red circle moving right", 8: "a blue square moving up"},
    num_frames=13,
    engine=DUAL_SCOPE,
    scheduler="sde-dpmsolver++",  # VideoCrafter2's sampler
    loop_cases={
        # a ring longer than the window; a ring of even length inside the window (every frame once,
        # one more back than forward); global frames (rank-invariant only: they sit at fixed frames)
        "window_in_ring": (7, {"loop": True, "attn": {"padding": 2, "top_k": 0, **PHASES}}),
        "ring_in_window": (8, {"loop": True, "attn": {"padding": 8, "top_k": 0, "token_num_scale": True, **PHASES}}),
        "globals": (7, {"loop": True, "attn": {"padding": 1, "top_k": 3, **PHASES}}),
    },
)

ANIMATEDIFF = FamilySpec(
    name="animatediff",
    build=build_animatediff_folder,
    reference=_animatediff,
    latent_frames=lambda n: n,
    parity_call=dict(prompt="a red circle", num_frames=12, height=32, width=32, num_inference_steps=2,
                     guidance_scale=3.0),
    parity_schedulers=("DDIMScheduler",),
    size=dict(height=32, width=32),
    prompt={0: "a red circle", 6: "a blue square moving left"},  # FreeNoise's keyframes
    num_frames=13,
    # motion windows of 8 frames (past the window: window-relative positions), blocks of 4 queries
    engine={**DUAL_SCOPE, "motion": {"window_frames": 8, "query_block_frames": 4}},
    scheduler="sde-dpmsolver++",
    guidance_scale=3.0,
    # no loop_cases: the motion windows are not on a ring (loop=True is accepted but not roll-equivariant)
)

WAN = FamilySpec(
    name="wan",
    # a feed-forward of 36 channels: a latent frame's 6 x 36 activations are no multiple of a vector
    # width, so an element-wise non-linearity's scalar tail would move with the clip's size
    build=lambda path: build_tiny_wan_folder(path, ffn_dim=36),
    reference=_wan,
    latent_frames=_wan_latent_frames,
    parity_call=dict(prompt="a cat runs on the beach", num_frames=17, height=16, width=16, num_inference_steps=2,
                     guidance_scale=5.0),
    parity_schedulers=(None,),  # the folder's flow-matching UniPC
    size=dict(height=32, width=48),  # 2 x 3 tokens per latent frame
    prompt=["a cat runs on the beach", "a dog jumps in snow"],  # one embedding per latent frame
    num_frames=25,  # 7 latent frames
    # blocks in chunks of 2 latent frames (block_tokens: 2 x 6 tokens; 1 token per frame in the parity run)
    engine={"attn": {"padding": 1, "top_k": 2, "token_num_scale": True,
                     "local_phase": {"t": 800, "local_biase": 3}, "global_phase": {"t": 800, "global_biase": 3}},
            "block_tokens": 12},
    whole_window={**WHOLE_WINDOW, "block_tokens": 2},
    scheduler="model",
    guidance_scale=5.0,
    loop_cases={
        "window_in_ring": (25, {"loop": True, "attn": {"padding": 2, "top_k": 0}, "block_tokens": 12}),
        "ring_in_window": (21, {"loop": True, "attn": {"padding": 5, "top_k": 0, "token_num_scale": True},
                                "block_tokens": 18}),
        "globals": (25, {"loop": True, "attn": {"padding": 1, "top_k": 2, "token_num_scale": True}}),
    },
    loop_scheduler="model",
    decode_atol=1e-5,  # the parallel VAE decode warms its caches up on a halo: equal up to rounding
)

# Image-to-video: first-last-frame (CLIP embeddings of both images, mask and image latents
# concatenated) and Wan2.2 TI2V (the image's latents in place of latent frame 0, timestep 0 there);
# Wan2.1 I2V and Wan2.2 A14B I2V are the first one's paths without a last image / CLIP (test_wan_i2v).
_I2V_COMMON = dict(
    latent_frames=_wan_latent_frames,
    reference=_wan_i2v,
    parity_schedulers=(None,),
    size=dict(height=32, width=48),
    prompt=["a cat runs on the beach", "a dog jumps in snow"],
    num_frames=17,  # 5 latent frames: uneven clips on 2, 3 and 4 ranks
    engine=WAN.engine,
    whole_window=WAN.whole_window,
    scheduler="model",
    guidance_scale=5.0,
    loop_cases={"ring_through_the_image": (25, {"loop": True, "attn": {"padding": 2, "top_k": 0}, "block_tokens": 12})},
    loop_scheduler="model",
    loops_roll=False,
    decode_atol=1e-5,
)
WAN_FLF = FamilySpec(
    name="wan_flf",
    build=lambda path: build_tiny_wan_i2v_folder(path, "flf"),
    parity_call=dict(prompt="a cat runs on the beach", num_frames=17, height=16, width=16, num_inference_steps=2,
                     guidance_scale=5.0, image=sample_image(1), last_image=sample_image(2)),
    inputs=dict(image=sample_image(1), last_image=sample_image(2)),
    loop_ends=(1, -2),  # the images condition the first and the last latent frame
    **_I2V_COMMON,
)
WAN_TI2V = FamilySpec(
    name="wan_ti2v",
    build=lambda path: build_tiny_wan_i2v_folder(path, "ti2v"),
    parity_call=dict(prompt="a cat runs on the beach", num_frames=17, height=16, width=16, num_inference_steps=2,
                     guidance_scale=5.0, image=sample_image(3)),
    inputs=dict(image=sample_image(3)),
    loop_ends=(1, -1),  # latent frame 0 is the image's own
    checkpoint=False,
    **_I2V_COMMON,
)

FAMILIES: tuple[FamilySpec, ...] = (UNET3D, ANIMATEDIFF, WAN, WAN_FLF, WAN_TI2V)
