"""Single-process tests of the engine's pure pieces: frame rules, attention math, GroupNorm, noise, hooks."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from video_infinity import ClipContext, EngineConfig, parallelize
from video_infinity.engine.attention import dual_scope_attention
from video_infinity.config import AttentionConfig
from video_infinity.frames import global_frame_indices, partition_frames, window, window_transfer_plan
from video_infinity.noise import frame_noise
from video_infinity.engine.norm import combine_moments, group_moments, video_group_norm

from harness import torch_threads
from references import dense_band_attention
from tiny_models import build_tiny_unet, load_unet


# ---------------------------------------------------------------- frames
@pytest.mark.parametrize("total,world", [(11, 4), (13, 4), (7, 7), (100, 8), (24, 1)])
def test_partition_is_contiguous_and_balanced(total, world):
    clips = partition_frames(total, world)
    assert [f for c in clips for f in c] == list(range(total))
    assert max(map(len, clips)) - min(map(len, clips)) <= 1


def test_partition_refuses_fewer_frames_than_ranks():
    with pytest.raises(ValueError, match="total_frames"):
        partition_frames(3, 4)


@pytest.mark.parametrize("total", [1, 5, 16, 2300])
@pytest.mark.parametrize("count", [0, 1, 3, 16, 40])
def test_global_frames_are_distinct_spread_and_rank_free(total, count):
    frames = global_frame_indices(total, count)
    assert len(frames) == min(count, total) == len(set(frames))
    assert all(0 <= f < total for f in frames) and frames == sorted(frames)
    if len(frames) > 1:  # evenly spread: gaps differ by at most one frame
        gaps = [b - a for a, b in zip(frames, frames[1:])]
        assert max(gaps) - min(gaps) <= 1


@pytest.mark.parametrize("total,world,halo", [(11, 4, 4), (13, 4, 4), (9, 9, 4), (20, 3, 2), (10, 2, 0)])
def test_transfer_plans_deliver_exactly_each_window(total, world, halo):
    clips = partition_frames(total, world)
    plans = [window_transfer_plan(clips, r, halo, halo) for r in range(world)]
    for rank, clip in enumerate(clips):
        held = set(clip) | {f for t in plans[rank].recvs for f in t.frames}
        assert held == set(window(clip, halo, halo, total))
        # every receive is matched by the owner's send, frame for frame
        for recv in plans[rank].recvs:
            assert any(s.peer == rank and s.frames == recv.frames for s in plans[recv.peer].sends)
    assert sum(len(p.sends) for p in plans) == sum(len(p.recvs) for p in plans)


# ---------------------------------------------------------------- attention math
def naive_dual_scope(q, k, v, gidx, padding, scale, local_bias, global_bias, token_num_scale):
    """Dense reference: every frame as a key under a frames x frames band mask, global keys appended."""
    total = q.shape[-2]
    i = torch.arange(total)
    band = (i[:, None] - i[None, :]).abs() <= padding
    return dense_band_attention(q, k, v, band, gidx, scale, local_bias, global_bias, token_num_scale)


@pytest.mark.parametrize("split_invariant", [True, False])
@pytest.mark.parametrize("padding,top_k,token_num_scale,chunk", [(2, 3, False, 4), (2, 3, True, 5), (0, 0, False, 64),
                                                                  (40, 5, True, 7), (5, 0, True, 1), (1, 17, False, 3)])
def test_dual_scope_attention_matches_dense_masked_softmax(padding, top_k, token_num_scale, chunk, split_invariant):
    torch.manual_seed(0)
    total = 17
    q, k, v = (torch.randn(3, 2, total, 8, dtype=torch.float64) for _ in range(3))
    gidx = global_frame_indices(total, top_k)
    # scale exactly representable in float32: SDPA rounds its scale to float32
    kwargs = dict(padding=padding, scale=0.375, local_bias=0.7, global_bias=-1.2)
    expected = naive_dual_scope(q, k, v, gidx, token_num_scale=token_num_scale, **kwargs)
    kwargs["split_invariant"] = split_invariant
    # whole video in one call, and the same queries split into clips with only their window of keys
    got = dual_scope_attention(q, k, v, k[..., gidx, :], v[..., gidx, :], query_frames=range(total),
                               key_frames=range(total), total_frames=total, token_num_scale=token_num_scale, chunk_size=chunk, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    for clip in partition_frames(total, 3):
        keys = window(clip, padding, padding, total)
        part = dual_scope_attention(q[..., clip.start:clip.stop, :], k[..., keys.start:keys.stop, :],
                                    v[..., keys.start:keys.stop, :], k[..., gidx, :], v[..., gidx, :],
                                    query_frames=clip, key_frames=keys, total_frames=total,
                                    token_num_scale=token_num_scale,
                                    chunk_size=chunk, **kwargs)
        torch.testing.assert_close(part, expected[..., clip.start:clip.stop, :], atol=1e-10, rtol=0)
    if not split_invariant:
        return
    # In float32 too, a query's result does not depend on the split: bit for bit (query blocks are
    # aligned to the video, so the chunk size is part of the settings, not of the split).
    q32, k32, v32 = q.float(), k.float(), v.float()
    whole = dual_scope_attention(q32, k32, v32, k32[..., gidx, :], v32[..., gidx, :], query_frames=range(total),
                                 key_frames=range(total), total_frames=total, token_num_scale=token_num_scale,
                                 chunk_size=chunk, **kwargs)
    for clip in partition_frames(total, 4):
        keys = window(clip, padding, padding, total)
        part = dual_scope_attention(q32[..., clip.start:clip.stop, :], k32[..., keys.start:keys.stop, :],
                                    v32[..., keys.start:keys.stop, :], k32[..., gidx, :], v32[..., gidx, :],
                                    query_frames=clip, key_frames=keys, total_frames=total,
                                    token_num_scale=token_num_scale, chunk_size=chunk, **kwargs)
        assert torch.equal(part, whole[..., clip.start:clip.stop, :])


@pytest.mark.parametrize("total", [64, 256])
def test_split_invariant_rank_attends_only_near_its_clip(monkeypatch, total):
    """With the default block size a rank's attention work does not grow with the video: a clip of
    16 aligned frames computes 16 query rows, whatever the video's length (with 64-frame blocks, every
    rank of a 64-frame video computed 64 rows, 48 of them zeros)."""
    rows = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        rows.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    config = AttentionConfig()
    chunk = config.query_chunk(split_invariant=True)
    assert chunk == 16 and config.query_chunk(split_invariant=False) == 64
    assert AttentionConfig(query_chunk_size=8).query_chunk(split_invariant=True) == 8
    padding, top_k = config.padding, config.top_k
    clip = range(16, 32)
    keys = window(clip, padding, padding, total)
    q = torch.randn(2, 1, len(clip), 4)
    k, v = (torch.randn(2, 1, len(keys), 4) for _ in range(2))
    kg, vg = (torch.randn(2, 1, top_k, 4) for _ in range(2))
    dual_scope_attention(q, k, v, kg, vg, query_frames=clip, key_frames=keys, total_frames=total, padding=padding,
                         scale=0.5, chunk_size=chunk, split_invariant=True)
    assert sum(r for r, _ in rows) == len(clip)
    assert max(key_rows for _, key_rows in rows) == len(clip) + 2 * padding + top_k


def test_phase_biases_follow_the_timestep():
    cfg = AttentionConfig(local_phase={"t": 800, "local_biase": 10, "global_biase": 1},
                          global_phase={"t": 700, "local_biase": 2, "global_biase": 10})
    assert cfg.phase_biases(900) == (2, 10)  # only the global phase (t >= 700)
    assert cfg.phase_biases(750) == (12, 11)  # both
    assert cfg.phase_biases(100) == (10, 1)  # only the local phase (t < 800)
    assert AttentionConfig(dynamic_scale=False).phase_biases(100) == (0, 0)


# ---------------------------------------------------------------- GroupNorm
def test_moments_combine_to_whole_video_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13, 3, 3, dtype=torch.float64) * 3 + 1
    parts = [group_moments(x[:, :, c.start:c.stop], 4) for c in partition_frames(13, 4)]
    mean, var = combine_moments(parts)
    flat = x.reshape(2, 4, -1)
    torch.testing.assert_close(mean, flat.mean(-1))
    torch.testing.assert_close(var, flat.var(-1, correction=0))


def test_video_group_norm_equals_torch_group_norm_and_ignores_halo_frames():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 10, 4, 4)
    torch.testing.assert_close(video_group_norm(x, norm, ClipContext()), norm(x), atol=1e-5, rtol=0)
    padded = torch.cat([torch.full((2, 8, 3, 4, 4), 100.0), x], dim=2)  # halo frames must not count
    out = video_group_norm(padded, norm, ClipContext(), owned=slice(3, 13))
    torch.testing.assert_close(out[:, :, 3:], norm(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- noise
def test_frame_noise_depends_only_on_seed_stream_and_frame():
    whole = frame_noise(5, range(0, 10), (1, 4, 6, 6))
    parts = torch.cat([frame_noise(5, range(0, 3), (1, 4, 6, 6)), frame_noise(5, range(3, 10), (1, 4, 6, 6))], dim=2)
    assert torch.equal(whole, parts)
    assert not torch.equal(frame_noise(5, range(1), (1, 4, 6, 6), stream=1), whole[:, :, :1])
    assert not torch.equal(frame_noise(6, range(1), (1, 4, 6, 6)), whole[:, :, :1])
    assert abs(whole.std().item() - 1) < 0.1


# ---------------------------------------------------------------- parallelize on one process
@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return load_unet(build_tiny_unet(tmp_path_factory.mktemp("unet") / "unet"))


def test_remove_restores_bit_identical_outputs(unet):
    x, text = torch.randn(1, 4, 9, 8, 8), torch.randn(1, 5, 16)
    with torch.no_grad():
        before = unet(x, 300, text).sample
        handle = parallelize(unet, {"attn": {"padding": 2, "top_k": 3}}, ClipContext())
        during = unet(x, 300, text).sample
        handle.remove()
        after = unet(x, 300, text).sample
    assert not torch.allclose(during, before, atol=1e-3)
    assert torch.equal(after, before)
    handle.remove()  # idempotent


def test_parallelize_twice_is_refused_and_non_video_models_are_refused(unet):
    handle = parallelize(unet, {"attn": {"padding": 4}})
    try:
        with pytest.raises(ValueError, match="already parallelized"):
            parallelize(unet, {})
    finally:
        handle.remove()
    with pytest.raises(TypeError, match="UNet3DConditionModel"):
        parallelize(nn.Linear(2, 2), {})


def test_per_frame_text_embeddings_match_per_frame_runs(unet):
    """Each frame's cross-attention uses its own embedding. With the temporal layers switched off
    (their output projections zeroed, so frames are independent), frames given embedding A equal a
    run where every frame has A."""
    import copy

    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    frozen = copy.deepcopy(unet)
    with torch.no_grad():
        for m in frozen.modules():
            last = m.conv4[-1] if isinstance(m, TemporalConvLayer) else m.proj_out if isinstance(m, TransformerTemporalModel) else None
            if last is not None:
                last.weight.zero_()
                last.bias.zero_()
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 8, 8)
    a, b = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    handle = parallelize(frozen, {})
    with torch.no_grad():
        mixed = frozen(x, 300, torch.stack([a, a, b, b], dim=1)).sample
        only_a = frozen(x, 300, a).sample
        only_b = frozen(x, 300, b).sample
        same = frozen(x, 300, torch.stack([a] * 4, dim=1)).sample
    handle.remove()
    torch.testing.assert_close(mixed[:, :, :2], only_a[:, :, :2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[:, :, 2:], only_b[:, :, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(same, only_a, atol=1e-5, rtol=0)
    assert (only_a - only_b).abs().max() > 1e-3


def test_input_frames_must_match_the_context(unet):
    handle = parallelize(unet, {}, ClipContext(total_frames=6))
    try:
        with pytest.raises(ValueError, match="owns frames 0..5"):
            unet(torch.randn(1, 4, 5, 8, 8), 10, torch.randn(1, 5, 16))
    finally:
        handle.remove()


def test_original_plugin_configs_validate():
    original = {
        "attn": {"padding": 8, "top_k": 16, "top_k_chunk_size": 24, "attn_scale": 1.0, "token_num_scale": False,
                 "dynamic_scale": True, "local_phase": {"t": 800, "local_biase": 10, "global_biase": 0},
                 "global_phase": {"t": 800, "local_biase": 0, "global_biase": 10}},
        "conv_3d": {"padding": 1},
        "conv_layer": {},
    }
    cfg = EngineConfig.model_validate(original)
    assert cfg.attn.padding == 8 and cfg.attn.local_phase.local_biase == 10 and cfg.norm_scope == "video"
    with pytest.raises(ValueError, match="padding"):
        EngineConfig.model_validate({"attn": {"padding": -1}})


def test_single_process_exchange_returns_own_frames_and_globals_in_order():
    from video_infinity.engine.comm import start_exchange

    ctx = ClipContext()
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    frames, span, globals_ = start_exchange(x, 1, ctx.layout_for(7), 2, 2, ctx, [5, 1, 3]).wait()
    assert frames is x and span == range(7)
    assert torch.equal(globals_, x[:, [5, 1, 3]])
    assert ctx.stats.total == 0  # nothing sent on one process


def test_global_keys_reuse_the_window_projection_and_keep_their_order():
    from diffusers.models.attention_processor import Attention

    from video_infinity.engine.attention import _project_keys_values

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    context_frames = range(3, 10)
    context = torch.randn(5, len(context_frames), 16)
    global_frames = [12, 4, 0, 7]  # two inside the window, two outside, interleaved
    global_states = torch.randn(5, len(global_frames), 16)
    global_states[:, 1], global_states[:, 3] = context[:, 4 - 3], context[:, 7 - 3]
    rows_projected = []
    attn.to_k.register_forward_hook(lambda module, args, out: rows_projected.append(args[0].shape[1]))
    key, value, global_key, global_value = _project_keys_values(attn, context, context_frames, global_states,
                                                                global_frames)
    assert rows_projected == [len(context_frames), 2]  # the window once, then only frames 12 and 0
    torch.testing.assert_close(key, attn.to_k(context), rtol=0, atol=1e-6)
    torch.testing.assert_close(value, attn.to_v(context), rtol=0, atol=1e-6)
    torch.testing.assert_close(global_key, attn.to_k(global_states), rtol=0, atol=1e-6)
    torch.testing.assert_close(global_value, attn.to_v(global_states), rtol=0, atol=1e-6)
    _, _, no_key, no_value = _project_keys_values(attn, context, context_frames, global_states[:, :0], [])
    assert no_key.shape == (5, 0, 16) and no_value.shape == (5, 0, 16)


def _hooked(module: nn.Module, hook) -> nn.Module:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "test")
    return module


@pytest.mark.unit
def test_each_per_frame_op_gives_a_frame_the_same_bits_in_any_clip():
    # Every op kind the split-invariant engine routes per frame, on a whole 11-frame clip and on a
    # 5-frame part of it: the shared frames must be equal bit for bit (different row counts and
    # batches would let kernels round differently).
    from video_infinity.context import DenoiseState
    from video_infinity.engine.frame_conv import frame_conv
    from video_infinity.engine.per_frame import FramesAxis, FramesFirstRowNorm, PerFrameCall, PerFrameLinear, PerFrameModule

    torch.manual_seed(0)
    config = EngineConfig(split_invariant=True)
    frames, part, batch = 11, slice(3, 8), 2
    # temporal convolution (kernel 3 along frames): the part carries one halo frame each side
    conv3d = nn.Conv3d(16, 24, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(batch, 16, frames, 4, 4)
    with torch.no_grad():
        whole, clip = frame_conv(x, conv3d), frame_conv(x[:, :, 2:9], conv3d)
        torch.testing.assert_close(whole, conv3d(x), atol=1e-5, rtol=0)
    assert torch.equal(clip[:, :, 1:6], whole[:, :, part])
    # temporal transformer rows (positions, frames, C): Linear one frame's rows per call, a
    # feed-forward (GEGLU) one call per frame, LayerNorm (row-local) one call frames-first
    from diffusers.models.attention import FeedForward

    rows = torch.randn(24, frames, 40)
    for layer, hook in ((nn.Linear(40, 56), PerFrameLinear(config, FramesAxis())),
                        (nn.Linear(40, 56, bias=False), PerFrameLinear(config, FramesAxis())),
                        (FeedForward(40, inner_dim=36, activation_fn="geglu"), PerFrameModule(config, FramesAxis())),
                        (nn.LayerNorm(40), FramesFirstRowNorm(config))):
        plain = layer(rows)
        _hooked(layer, hook)
        with torch.no_grad():
            whole, clip = layer(rows), layer(rows[:, part].contiguous())
        torch.testing.assert_close(whole, plain, atol=1e-5, rtol=0)
        assert torch.equal(clip, whole[:, part])
    # spatial layers (batch * frames images, batch-major) one frame per call
    images = torch.randn(batch * frames, 16, 6, 6)

    def frames_of(t: torch.Tensor, f: slice) -> torch.Tensor:
        return t.reshape(batch, frames, *t.shape[1:])[:, f].reshape(-1, *t.shape[1:])

    for layer in (nn.Conv2d(16, 24, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 24, 1)):
        plain = layer(images)
        state = DenoiseState(batch=batch)
        _hooked(layer, PerFrameCall(config, state))
        with torch.no_grad():
            state.layout = ClipContext().layout_for(frames)
            whole = layer(images)
            state.layout = ClipContext().layout_for(part.stop - part.start)
            clip = layer(frames_of(images, part).contiguous())
        torch.testing.assert_close(whole, plain, atol=1e-5, rtol=0)
        assert torch.equal(clip, frames_of(whole, part))


@pytest.mark.unit
def test_a_feed_forward_called_per_frame_keeps_its_gelu_tails_whatever_the_thread_split():
    # A GELU's vectorised body and scalar tail round differently, and with 3 threads a tensor's
    # thread shares start mid-row at offsets set by its size: with only its Linears per frame, a
    # feed-forward's frame then rounds differently in an 11-frame clip and in a 5-frame part of it.
    # Called per frame as a whole, its GELU's shape (and split) is the frame's.
    from diffusers.models.attention import FeedForward
    from video_infinity.engine.per_frame import FramesAxis, PerFrameLinear, PerFrameModule

    config = EngineConfig(split_invariant=True)
    rows, part = torch.randn(301, 11, 40, generator=torch.Generator().manual_seed(0)), slice(3, 8)
    outputs = {}
    for per_frame in ("linears", "feed_forward"):
        torch.manual_seed(1)
        ff = FeedForward(40, inner_dim=36, activation_fn="geglu")
        for module in [m for m in ff.modules() if isinstance(m, nn.Linear)] if per_frame == "linears" else [ff]:
            hook = PerFrameModule if isinstance(module, FeedForward) else PerFrameLinear
            _hooked(module, hook(config, FramesAxis()))
        with torch_threads(3), torch.no_grad():
            outputs[per_frame] = ff(rows), ff(rows[:, part].contiguous())
    whole, clip = outputs["feed_forward"]
    torch.testing.assert_close(whole, outputs["linears"][0], atol=1e-6, rtol=0)
    if torch.equal(outputs["linears"][1], outputs["linears"][0][:, part]):
        pytest.skip("this CPU's GELU rounds alike in vector body and scalar tail: nothing to tell apart")
    assert torch.equal(clip, whole[:, part])


@pytest.mark.unit
def test_each_wan_per_frame_op_gives_a_latent_frame_the_same_bits_in_any_clip():
    # The Wan token path's per-frame ops on a whole 11-latent-frame clip and on a 5-frame part of it
    # (batch 2, 5 tokens per frame, frame-major): the shared frames must be equal bit for bit, and
    # the hooked ops must compute what the plain modules compute. Sizes are chosen so that a frame's
    # element count is no multiple of a vector width (the tanh-GELU's scalar tail then moves with
    # the clip's size).
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanTimeTextImageEmbedding

    from video_infinity.context import DenoiseState
    from video_infinity.engine.per_frame import FrameMajorTokens, PerFrameLinear, PerFrameModule, PerFrameText, TokenTimesteps
    from video_infinity.families.wan.engine import WanFrameCrossAttnProcessor, _PatchEmbeddingAsMatmul

    torch.manual_seed(0)
    config = EngineConfig(split_invariant=True)
    batch, frames, tokens, part = 2, 11, 5, slice(3, 8)
    state = DenoiseState(batch=batch, tokens_per_frame=tokens)

    def call(module: nn.Module, x: torch.Tensor, clip_frames: int, *args) -> torch.Tensor:
        state.layout = ClipContext().layout_for(clip_frames)
        with torch.no_grad():
            return module(x, *args)

    def tokens_of(t: torch.Tensor, f: slice) -> torch.Tensor:  # (batch, frames*tokens, C) -> the frames f
        return t.unflatten(1, (-1, tokens))[:, f].flatten(1, 2).contiguous()

    x = torch.randn(batch, frames * tokens, 40)
    rows = FrameMajorTokens(state)
    layers = [(nn.Linear(40, 56), PerFrameLinear(config, rows)),
              (nn.Linear(40, 56, bias=False), PerFrameLinear(config, rows)),
              (FeedForward(40, inner_dim=36, activation_fn="gelu-approximate"), PerFrameModule(config, rows))]
    for layer, hook in layers:
        with torch.no_grad():
            plain = layer(x)
        _hooked(layer, hook)
        whole, clip = call(layer, x, frames), call(layer, tokens_of(x, part), part.stop - part.start)
        torch.testing.assert_close(whole, plain, atol=1e-5, rtol=0)
        assert torch.equal(clip, tokens_of(whole, part))

    # the patch embedding (a Conv3d whose kernel is its stride) as one product per frame
    patchify = nn.Conv3d(4, 24, (1, 2, 2), stride=(1, 2, 2))
    video = torch.randn(batch, 4, frames, 4, 6)
    with torch.no_grad():
        plain = patchify(video)
    _hooked(patchify, _PatchEmbeddingAsMatmul(config))
    whole = call(patchify, video, frames)
    clip = call(patchify, video[:, :, part].contiguous(), part.stop - part.start)
    torch.testing.assert_close(whole, plain, atol=1e-5, rtol=0)
    assert torch.equal(clip, whole[:, :, part])

    # cross-attention to shared (3-D) and per-frame (4-D) text, one attention call per frame
    attn = WanAttention(dim=24, heads=2, dim_head=12, cross_attention_dim_head=12, processor=WanAttnProcessor())
    for linear in (attn.to_q, attn.to_out[0]):
        _hooked(linear, PerFrameLinear(config, rows))
    attn.set_processor(WanFrameCrossAttnProcessor(WanAttnProcessor(), config, state))
    hidden = torch.randn(batch, frames * tokens, 24)
    shared_text, frame_text = torch.randn(batch, 7, 24), torch.randn(batch, frames, 7, 24)
    for text, text_part in ((shared_text, shared_text), (frame_text, frame_text[:, part].contiguous())):
        whole = call(attn, hidden, frames, text)
        clip = call(attn, tokens_of(hidden, part), part.stop - part.start, text_part)
        assert torch.equal(clip, tokens_of(whole, part))
    # against diffusers' processor, frame by frame with that frame's text
    whole = call(attn, hidden, frames, frame_text)
    attn.set_processor(WanAttnProcessor())
    for f in (0, 6):
        expected = call(attn, tokens_of(hidden, slice(f, f + 1)), 1, frame_text[:, f])
        torch.testing.assert_close(tokens_of(whole, slice(f, f + 1)), expected, atol=1e-5, rtol=0)

    # the condition embedder: per-frame text, and one timestep per token (Wan2.2 TI2V)
    embedder = WanTimeTextImageEmbedding(dim=24, time_freq_dim=32, time_proj_dim=6 * 24, text_embed_dim=20)
    _hooked(embedder.text_embedder, PerFrameModule(config, PerFrameText()))
    for module in (embedder.timesteps_proj, embedder.time_embedder, embedder.act_fn, embedder.time_proj):
        _hooked(module, PerFrameModule(config, TokenTimesteps(state)))
    steps = torch.rand(batch, frames * tokens) * 1000
    text = torch.randn(batch, frames, 7, 20)

    def embed(f: slice) -> tuple[torch.Tensor, ...]:
        clip_steps, clip_text = tokens_of(steps[..., None], f)[..., 0], text[:, f].contiguous()
        state.token_timesteps = True
        state.layout = ClipContext().layout_for(f.stop - f.start)
        with torch.no_grad():
            temb, projected, embedded, _ = embedder(clip_steps.flatten(), clip_text, timestep_seq_len=clip_steps.shape[1])
        return temb, projected, embedded

    whole, clip = embed(slice(0, frames)), embed(part)
    for got, full in zip(clip[:2], whole[:2]):  # (batch, tokens, C)
        assert torch.equal(got, tokens_of(full, part))
    assert torch.equal(clip[2], whole[2][:, part])
    state.token_timesteps = False
    with torch.no_grad():
        plain = embedder(steps.flatten(), text, timestep_seq_len=steps.shape[1])
    for got, expected in zip(whole, plain[:3]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
