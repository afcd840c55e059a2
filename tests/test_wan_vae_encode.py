"""Wan's VAE encode across ranks (image-to-video's condition video): each rank's latent means equal
those of ``vae.encode`` on the whole video.

``encode_wan_frames`` warms a fresh encoder up on the video frames of ``wan_encoder_receptive_field``
preceding latent frames; here: the field's values (the tiny VAEs, Wan2.1's and Wan2.2's real layouts on
the meta device), splits of a video of ``field + 6`` latent frames matching the whole-video encode
(Wan2.1's layout and Wan2.2's patchified residual one, a random video and ``[image, zeros..., last]``),
one frame less of warm-up not being exact (the field is tight), the video frames asked for, tiling and
slicing.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from tiny_models import build_tiny_wan_vae
from video_infinity.families.wan.vae import encode_wan_frames, video_frame_count, wan_encoder_receptive_field

pytestmark = pytest.mark.unit

SIZE = 32
"""Pixels a side: 4x4 latents for the Wan2.1 layout, 2x2 for Wan2.2's (16x spatial)."""
EXACT = 1e-5


def _randomise(vae: AutoencoderKLWan, seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def build_tiny_wan22_vae(seed: int = 0) -> AutoencoderKLWan:
    """Wan2.2's VAE layout at toy width: patchified input (patch 2, 12 channels), residual down blocks."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return _randomise(vae, seed)


VAES = {"wan21": build_tiny_wan_vae, "wan22": build_tiny_wan22_vae}


@pytest.fixture(scope="module", params=sorted(VAES))
def vae(request) -> AutoencoderKLWan:
    return VAES[request.param]()


def random_video(latent_frames: int, batch: int = 1, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, video_frame_count(latent_frames), SIZE, SIZE, generator=g) * 2 - 1


def condition_video(latent_frames: int, batch: int = 2, seed: int = 4) -> torch.Tensor:
    """Image-to-video's first-last-frame condition: ``[image, zeros..., last_image]``."""
    g = torch.Generator().manual_seed(seed)
    video = torch.zeros(batch, 3, video_frame_count(latent_frames), SIZE, SIZE)
    video[:, :, 0] = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    video[:, :, -1] = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    return video


class Frames:
    """``frames`` for ``encode_wan_frames`` from a video in memory, recording the ranges asked for."""

    def __init__(self, video: torch.Tensor) -> None:
        self.video, self.asked = video, []

    def __call__(self, frames: range) -> torch.Tensor:
        assert frames.step == 1 and frames.start >= 0 and frames.stop <= self.video.shape[2]
        self.asked.append(frames)
        return self.video[:, :, frames.start : frames.stop]


def whole(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(video).latent_dist.mode()


def test_receptive_field_of_the_tiny_and_real_layouts():
    assert wan_encoder_receptive_field(build_tiny_wan_vae()) == 20
    assert wan_encoder_receptive_field(build_tiny_wan22_vae()) == 20
    with torch.device("meta"):
        wan21 = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True])
        wan22 = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                                 in_channels=12, out_channels=12, scale_factor_spatial=16)
    assert wan_encoder_receptive_field(wan21) == 28
    assert wan_encoder_receptive_field(wan22) == 28


SPLITS = [
    [0, 26],  # one rank
    [0, 5, 13, 26],  # uneven; the last rank starts within the field (from frame 0), ...
    [0, 1, 2, 21, 26],  # ... or after it (a fresh encoder at video frame 4)
    [0, 25, 26],  # a last rank of one latent frame, warmed up from frame 4 * 5
]


@pytest.mark.parametrize("kind", ["random", "condition"])
def test_ranges_match_the_whole_video_encode(vae, kind):
    field = wan_encoder_receptive_field(vae)
    latent = field + 6
    assert latent == SPLITS[0][-1]
    video = random_video(latent) if kind == "random" else condition_video(latent)
    reference = whole(vae, video)
    first = None
    for split in SPLITS:
        parts = [encode_wan_frames(vae, Frames(video), range(a, b)) for a, b in zip(split[:-1], split[1:])]
        assert all(p.shape == (video.shape[0], *reference.shape[1:2], b - a, *reference.shape[3:])
                   for p, a, b in zip(parts, split[:-1], split[1:]))
        got = torch.cat(parts, dim=2)
        assert (got - reference).abs().max().item() <= EXACT, split
        # split-invariant: a latent frame is the same bit for bit whichever range encodes it
        first = got if first is None else first
        assert torch.equal(got, first), (split, (got - first).abs().max().item())


@pytest.mark.parametrize("name", sorted(VAES))
def test_one_frame_less_of_warm_up_is_not_exact(name):
    """At ``halo = field - 1`` the first owned latent frame differs (the field is the smallest exact halo).

    In float64, so that the exact encodes are exact to ~1e-16 and the short ones clearly are not (how far
    they are off depends on the weights: a path through every layer's oldest tap; 1e-5 to 3e-4 here)."""
    vae = VAES[name]().double()
    field = wan_encoder_receptive_field(vae)
    latent = field + 6
    video = random_video(latent).double()
    reference = whole(vae, video)
    exact, short = [], []
    for a in (field, field + 2, field + 3, latent - 1):
        got = encode_wan_frames(vae, Frames(video), range(a, a + 1))
        exact.append((got - reference[:, :, a : a + 1]).abs().max().item())
        got = encode_wan_frames(vae, Frames(video), range(a, a + 1), halo=field - 1)
        short.append((got - reference[:, :, a : a + 1]).abs().max().item())
    assert max(exact) <= 1e-12, exact
    assert min(short) > 1e-9 and max(short) > 5 * EXACT, short


@pytest.mark.parametrize("latent_frames, halo", [(range(0, 4), None), (range(5, 13), None), (range(21, 26), None),
                                                 (range(25, 26), 3), (range(7, 9), 0), (range(3, 10), 3)])
def test_frames_are_asked_chunk_by_chunk_from_the_warm_up_on(latent_frames, halo):
    vae = build_tiny_wan_vae()
    field = wan_encoder_receptive_field(vae)
    frames = Frames(random_video(26))
    encode_wan_frames(vae, frames, latent_frames, halo=halo)
    start = max(latent_frames.start - (field if halo is None else halo), 0)
    asked = [i for r in frames.asked for i in r]
    assert asked == list(range(4 * start, video_frame_count(latent_frames.stop)))  # each once, in order
    assert len(frames.asked[0]) == 1 and all(len(r) == 4 for r in frames.asked[1:])


def test_tiling_encodes_the_needed_frames_through_vae_encode():
    vae = build_tiny_wan_vae()
    vae.enable_tiling(tile_sample_min_height=SIZE, tile_sample_min_width=24, tile_sample_stride_height=SIZE,
                      tile_sample_stride_width=16)  # 2 tiles side by side, 3 latents wide, blended over 1
    field = wan_encoder_receptive_field(vae)
    video = random_video(field + 2)
    reference = whole(vae, video)
    for latent_frames in (range(0, field + 1), range(field + 1, field + 2)):
        frames = Frames(video)
        got = encode_wan_frames(vae, frames, latent_frames)
        assert (got - reference[:, :, latent_frames.start : latent_frames.stop]).abs().max().item() <= EXACT
        start = max(latent_frames.start - field, 0)
        assert [i for r in frames.asked for i in r] == list(range(4 * start, video_frame_count(latent_frames.stop)))


def test_slicing_encodes_each_sample_alone():
    vae = build_tiny_wan_vae()
    vae.use_slicing = True
    field = wan_encoder_receptive_field(vae)
    video = condition_video(field + 2, batch=2)
    reference = whole(vae, video)
    got = torch.cat([encode_wan_frames(vae, Frames(video), r) for r in (range(0, 3), range(3, field + 2))], dim=2)
    assert (got - reference).abs().max().item() <= EXACT
