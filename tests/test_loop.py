"""Seamless loops (``EngineConfig.loop``): the frames on a ring.

Unit tests of the ring's frame rules and attention math in one process, and the UNet's loop against
independent references. Roll-equivariance and rank invariance of every family: test_conformance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from video_infinity import ClipContext, EngineConfig, parallelize
from video_infinity.engine.attention import dual_scope_attention
from video_infinity.run.config import ConfigError, validate_run_config
from video_infinity.frames import (
    attention_reach,
    global_frame_indices,
    partition_frames,
    ring_offset,
    window,
    window_pieces,
    window_transfer_plan,
)

from references import dense_band_attention
from tiny_models import build_tiny_unet, load_unet

TIMESTEP = 500
PHASES = {"local_phase": {"t": 600, "local_biase": 1.5, "global_biase": -0.5},
          "global_phase": {"t": 400, "local_biase": -0.3, "global_biase": 2.0}}
# (frames, settings): a ring longer than the window, and a ring of even length shorter than the
# window (every frame once, one more back than forward), with token_num_scale.
RING_CASES = {
    "window_in_ring": (7, {"loop": True, "attn": {"padding": 2, "top_k": 0, **PHASES}}),
    "ring_in_window": (8, {"loop": True, "attn": {"padding": 8, "top_k": 0, "token_num_scale": True, **PHASES}}),
}


# ---------------------------------------------------------------- frame rules
@pytest.mark.unit
@pytest.mark.parametrize("padding,total,expected", [(2, 7, (2, 2)), (3, 7, (3, 3)), (4, 7, (3, 3)), (3, 6, (3, 2)),
                                                    (8, 8, (4, 3)), (0, 1, (0, 0)), (5, 1, (0, 0))])
def test_ring_window_holds_each_frame_at_most_once(padding, total, expected):
    left, right = attention_reach(padding, total, loop=True)
    assert (left, right) == expected
    for frame in range(total):
        seen = [(frame + d) % total for d in range(-left, right + 1)]
        assert len(seen) == len(set(seen)) == min(2 * padding + 1, total)
    assert attention_reach(padding, total, loop=False) == (min(padding, total - 1),) * 2


@pytest.mark.unit
@pytest.mark.parametrize("total,world,halo", [(7, 3, 4), (13, 4, 4), (3, 2, 4), (1, 1, 4), (10, 2, 0), (20, 3, 2)])
def test_ring_transfer_plans_deliver_each_unwrapped_window(total, world, halo):
    clips = partition_frames(total, world)
    plans = [window_transfer_plan(clips, r, halo, halo, loop=True) for r in range(world)]
    for rank, clip in enumerate(clips):
        span = window(clip, halo, halo, total, loop=True)
        assert span == range(clip.start - halo, clip.stop + halo)
        pieces = sorted(plans[rank].local + plans[rank].recvs, key=lambda t: t.at)
        # The pieces tile the span in order, and position u holds frame u mod total.
        assert [t.at + i for t in pieces for i in range(len(t.frames))] == list(span)
        assert [f for t in pieces for f in t.frames] == [u % total for u in span]
        assert all(t.peer == rank and t.frames == range(t.frames.start, t.frames.stop) for t in plans[rank].local)
        assert all(set(t.frames) <= set(clips[t.peer]) for t in pieces)
        # Between each pair, the owner's sends are this rank's receives in the same order.
        for peer in range(world):
            if peer != rank:
                got = [(t.frames, t.at) for t in plans[rank].recvs if t.peer == peer]
                sent = [(t.frames, t.at) for t in plans[peer].sends if t.peer == rank]
                assert got == sent
    # Without the loop nothing changes: the clipped window's pieces and the old plan.
    for rank, clip in enumerate(clips):
        plain = window_transfer_plan(clips, rank, halo, halo)
        pieces = window_pieces(clips, rank, halo, halo)
        assert [f for t in pieces for f in t.frames] == list(window(clip, halo, halo, total))
        assert all(t.at == t.frames.start for t in plain.recvs + plain.sends)


@pytest.mark.unit
def test_ring_offset_finds_a_frame_in_unwrapped_and_clipped_spans():
    assert ring_offset(range(-2, 3), 6, 7) == 1  # position -1 is frame 6
    assert ring_offset(range(-2, 3), 4, 7) is None
    assert ring_offset(range(5, 12), 1, 7) == 3  # position 8 is frame 1
    assert ring_offset(range(2, 5), 4, 7) == 2 and ring_offset(range(2, 5), 1, 7) is None


@pytest.mark.unit
def test_single_process_ring_exchange_wraps_around():
    from video_infinity.engine.comm import start_exchange

    ctx = ClipContext()
    x = torch.arange(5, dtype=torch.float32).view(1, 5, 1).expand(2, 5, 3).contiguous()
    frames, span, globals_ = start_exchange(x, 1, ctx.layout_for(5), 7, 3, ctx, [4, 0], loop=True).wait()
    assert span == range(-7, 8)
    assert frames[0, :, 0].tolist() == [float(u % 5) for u in span]  # frame 0 three times: the ring is short
    assert globals_[0, :, 0].tolist() == [4.0, 0.0]
    assert ctx.stats.total == 0


@pytest.mark.unit
def test_global_keys_come_from_the_unwrapped_window():
    from diffusers.models.attention_processor import Attention

    from video_infinity.engine.attention import _project_keys_values

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    video = torch.randn(3, 5, 16)
    span = range(-2, 5)  # frames 3, 4, 0, 1, 2, 3, 4
    context = video[:, [u % 5 for u in span]]
    _, _, global_key, global_value = _project_keys_values(attn, context, span, video[:, :0], [4, 1], total_frames=5)
    torch.testing.assert_close(global_key, attn.to_k(video[:, [4, 1]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(global_value, attn.to_v(video[:, [4, 1]]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- attention math
def naive_ring_attention(q, k, v, gidx, padding, scale, local_bias, global_bias, token_num_scale):
    """Dense reference on the ring: frame i's local keys are frames (i + d) mod T for d in the ring
    window, built as a frames x frames mask from circular distances."""
    total = q.shape[-2]
    left, right = attention_reach(padding, total, loop=True)
    i = torch.arange(total)
    ahead = (i[None, :] - i[:, None]) % total  # how far key j lies after query i, around the ring
    band = (ahead <= right) | (total - ahead <= left)
    return dense_band_attention(q, k, v, band, gidx, scale, local_bias, global_bias, token_num_scale)


@pytest.mark.unit
@pytest.mark.parametrize("split_invariant", [True, False])
@pytest.mark.parametrize("total,padding,top_k,token_num_scale,chunk", [(11, 2, 0, False, 4), (11, 3, 3, True, 5),
                                                                       (8, 5, 2, True, 3), (9, 40, 0, False, 64),
                                                                       (6, 3, 0, True, 2)])
def test_ring_attention_matches_dense_circular_mask(total, padding, top_k, token_num_scale, chunk, split_invariant):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, total, 8, dtype=torch.float64) for _ in range(3))
    gidx = global_frame_indices(total, top_k)
    kwargs = dict(padding=padding, scale=0.375, local_bias=0.7, global_bias=-1.2, token_num_scale=token_num_scale)
    expected = naive_ring_attention(q, k, v, gidx, **kwargs)
    left, right = attention_reach(padding, total, loop=True)
    for world in (1, 3):
        for clip in partition_frames(total, world):
            keys = window(clip, left, right, total, loop=True)
            ring = [u % total for u in keys]  # the unwrapped window's frames, as the exchange delivers them
            part = dual_scope_attention(q[..., clip.start:clip.stop, :], k[..., ring, :], v[..., ring, :],
                                        k[..., gidx, :], v[..., gidx, :], query_frames=clip, key_frames=keys,
                                        total_frames=total, chunk_size=chunk, split_invariant=split_invariant,
                                        loop=True, **kwargs)
            torch.testing.assert_close(part, expected[..., clip.start:clip.stop, :], atol=1e-10, rtol=0)


# ---------------------------------------------------------------- the UNet on one process
@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    return build_tiny_unet(tmp_path_factory.mktemp("loop") / "unet")


def _run(unet, settings: dict, x: torch.Tensor, text: torch.Tensor, ctx: ClipContext | None = None) -> torch.Tensor:
    handle = parallelize(unet, EngineConfig.model_validate(settings), ctx or ClipContext())
    try:
        with torch.no_grad():
            return unet(x, TIMESTEP, text).sample
    finally:
        handle.remove()


def _inputs(total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, total, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)


@pytest.mark.unit
def test_loop_equals_the_middle_of_the_video_repeated(unet_dir):
    """Independent references for the ring of T frames.

    1. The middle copy of the video repeated 15 times without a loop: the middle copy lies 49 frames
       from the ends, beyond the reach of the tiny UNet's 8 temporal conv layers (4 frames each
       side) and 5 temporal attentions (2 frames). Not exact: the whole-video GroupNorm statistics
       of the repeated video include its 2 x 42 edge-affected frames, an error that shrinks as
       1/copies (3 copies: 1.6e-3, 15: 3e-4); the loop's first and last frames are off by 1e-2
       without the loop.
    2. A ring of two copies is the ring of one, twice (exact math; other windows and transfers).
    """
    unet = load_unet(unet_dir)
    total, settings = RING_CASES["window_in_ring"]
    copies = 15
    x, text = _inputs(total, seed=2)
    out = _run(unet, settings, x, text)
    tiled = _run(unet, {**settings, "loop": False}, torch.cat([x] * copies, dim=2), text)
    middle = copies // 2 * total
    torch.testing.assert_close(out, tiled[:, :, middle : middle + total], atol=1e-3, rtol=0)
    assert (out - _run(unet, {**settings, "loop": False}, x, text)).abs().max() > 1e-2
    twice = _run(unet, settings, torch.cat([x, x], dim=2), text)
    torch.testing.assert_close(twice, torch.cat([out, out], dim=2), atol=1e-5, rtol=0)


@pytest.mark.unit
def test_loop_needs_convolution_halos():
    assert EngineConfig().loop is False
    assert EngineConfig.model_validate({"loop": True}).loop is True
    with pytest.raises(ValueError, match="conv_layer.enabled"):
        EngineConfig.model_validate({"loop": True, "conv_layer": {"enabled": False}})
    # A run config names the field, in one line, before any model loads.
    with pytest.raises(ConfigError, match=r"^plugin_configs\.loop: needs .* conv_layer\.enabled"):
        validate_run_config({"devices": ["cpu"], "pipe_configs": {"prompts": ["a"], "total_frames": 8},
                             "plugin_configs": {"loop": True, "conv_layer": {"enabled": False}}})
