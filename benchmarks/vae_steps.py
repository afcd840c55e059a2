"""The demo-wan VAE's own motion steps: where a decoded object moves unevenly, with no transformer involved.

The probe's clip-border check divides the object's step across a border by its median step. With
Wan's causal VAE (4 video frames per latent frame) a border between ranks is always a border
between latent frames too (the first frame of a latent frame: 4k + 1). This script encodes and
decodes ground-truth procedural clips (every colour x shape x direction, 33 frames, the shape moving
the training speed, 2 px a frame, with its trail) through the shipped ``demo-wan`` VAE and reports
the object's median step by the step's place in the latent frame: ``into_latent`` (frame 4k to
4k + 1, which crosses from one latent frame into the next), and the three steps inside a latent
frame. On the ground truth every step is the same, so what differs is the VAE's.

    python benchmarks/vae_steps.py [--clips-per-class 1] [--vae CANDIDATE_FOLDER]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from _common import PROBE, machine, setup_logging, write_result

logger = logging.getLogger("bench.vae_steps")

MEASURES = ("src/video_infinity/demo/data.py", "src/video_infinity/demo/train_wan.py",
            "src/video_infinity/demo/weights_wan", *PROBE)


def median_steps(videos: np.ndarray, compression: int) -> dict[str, float]:
    """Median object step (px) by the step's place: ``into_latent`` (frame ck -> ck + 1, ``c`` the VAE's
    temporal ``compression``) and ``inside`` (the others), over uint8 videos (N, frames, H, W, 3), and the
    median over all steps."""
    from video_infinity.demo import data, probe

    into, inside, every = [], [], []
    for video in videos:
        step = np.linalg.norm(probe.steps(probe.track(video), data.SIZE, data.SIZE), axis=1)
        for i, s in enumerate(step):  # step i goes from frame i to frame i + 1
            (into if i % compression == 0 else inside).append(s)
            every.append(s)
    return {"into_latent": float(np.nanmedian(into)), "inside": float(np.nanmedian(inside)),
            "all": float(np.nanmedian(every)), "into_latent_over_all": float(np.nanmedian(into) / np.nanmedian(every))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=1)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--vae", default=None, help="another VAE folder to check (a candidate); then nothing is written")
    args = parser.parse_args()
    setup_logging()
    info = machine()
    from diffusers import AutoencoderKLWan

    from video_infinity.demo import WAN_WEIGHTS_DIR, data, train_wan

    vae = AutoencoderKLWan.from_pretrained(args.vae or WAN_WEIGHTS_DIR / "vae").eval()
    rng = np.random.default_rng(args.seed)
    specs = [train_wan.random_spec(rng, [c]) for _ in range(args.clips_per_class) for c in data.all_classes()]
    clips = np.stack([data.render(s, train_wan.CLIP_FRAMES, trail=data.TRAIL) for s in specs])
    decoded = []
    with torch.no_grad():
        for first in range(0, len(clips), 12):
            x = train_wan.video_tensor(clips[first:first + 12])
            z = vae.encode(x).latent_dist.mode()
            y = vae.decode(z, return_dict=False)[0].clamp(-1, 1)
            decoded.append(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy())
    compression = vae.config.scale_factor_temporal
    result = {"ground_truth": median_steps(clips, compression),
              "decoded": median_steps(np.concatenate(decoded), compression)}
    logger.info("median step (px) ground truth %s; decoded %s", result["ground_truth"], result["decoded"])
    if args.vae:
        return
    write_result("vae_steps", {"what": __doc__.splitlines()[0], "machine": info, "clips": len(specs),
                               "frames": train_wan.CLIP_FRAMES, "speed_px_per_frame": train_wan.SPEED, "seed": args.seed,
                               "results": result},
                 MEASURES)


if __name__ == "__main__":
    main()
