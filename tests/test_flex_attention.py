"""The fused GPU path's band attention in one FlexAttention call (``engine.flex``), on CPU: its block
mask against the token-level band (the unfused reference that runs on CPU ignores the block lists,
so they are checked here directly), its result against the dense reference and the per-frame path,
and its meta-device allocations and FLOPs (the planner's)."""

from __future__ import annotations

import math

import pytest
import torch

from video_infinity import EngineConfig
from video_infinity.engine.attention import dual_scope_attention
from video_infinity.engine.flex import BLOCK, band_attention, band_block_mask
from video_infinity.frames import attention_reach, global_frame_indices, window
from video_infinity.memory import measure

from references import dense_band_attention



def _dense_blocks(counts: torch.Tensor, indices: torch.Tensor, columns: int) -> torch.Tensor:
    rows = counts.shape[-1]
    dense = torch.zeros(rows, columns, dtype=torch.bool)
    for row in range(rows):
        dense[row, indices[0, 0, row, : counts[0, 0, row]].long()] = True
    return dense


@pytest.mark.unit
@pytest.mark.parametrize("tokens", [1, 7, 128, 130, 1560 // 20])
@pytest.mark.parametrize("query_frames,key_frames,left,right,num_global", [
    (range(0, 9), range(0, 12), 3, 3, 2), (range(5, 12), range(1, 16), 4, 4, 0), (range(9, 10), range(1, 18), 8, 8, 4),
    (range(0, 6), range(-3, 9), 3, 2, 1),  # a ring's unwrapped, asymmetric window
])
def test_block_mask_lists_exactly_the_blocks_the_band_touches(tokens, query_frames, key_frames, left, right, num_global):
    """Every block holding a visible (query, key) pair is listed (none else), and a block is "full"
    (the kernel skips its mask) only if every pair in it is visible and it is not cut by a
    sequence's end."""
    num_q, num_local = len(query_frames) * tokens, len(key_frames) * tokens
    num_kv = num_local + num_global * tokens
    mask = band_block_mask(query_frames, key_frames, num_global * tokens, tokens, left, right, torch.device("cpu"))
    q_frame = query_frames.start + torch.arange(num_q) // tokens
    k_frame = key_frames.start + torch.arange(num_kv) // tokens
    distance = k_frame[None, :] - q_frame[:, None]
    visible = ((distance >= -left) & (distance <= right)) | (torch.arange(num_kv) >= num_local)[None, :]
    assert torch.equal(mask.mask_mod(0, 0, torch.arange(num_q)[:, None], torch.arange(num_kv)[None, :]), visible)
    rows, columns = math.ceil(num_q / BLOCK), math.ceil(num_kv / BLOCK)
    padded = torch.zeros(rows * BLOCK, columns * BLOCK, dtype=torch.bool)
    padded[:num_q, :num_kv] = visible
    blocks = padded.view(rows, BLOCK, columns, BLOCK)
    some, every = blocks.any(3).any(1), blocks.all(3).all(1)  # cut blocks are never all-visible
    partial = _dense_blocks(mask.kv_num_blocks, mask.kv_indices, columns)
    full = _dense_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, columns)
    assert not (partial & full).any()
    assert torch.equal(partial | full, some)
    assert torch.equal(full, every)


def _case(total, padding, tokens, query_frames, loop, num_global, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    left, right = attention_reach(padding, total, loop)
    needed = window(query_frames, left, right, total, loop)
    context = range(needed.start - 1, needed.stop + 1) if loop else \
        range(max(0, needed.start - 1), min(total, needed.stop + 1))
    q = torch.randn(2, 3, len(query_frames) * tokens, 16, generator=generator, dtype=dtype)
    k, v = (torch.randn(2, 3, len(context) * tokens, 16, generator=generator, dtype=dtype) for _ in range(2))
    kg, vg = (torch.randn(2, 3, num_global * tokens, 16, generator=generator, dtype=dtype) for _ in range(2))
    return dict(q=q, k=k, v=v, kg=kg, vg=vg, context=context, left=left, right=right)


@pytest.mark.unit
@pytest.mark.parametrize("total,padding,tokens,query_frames,loop", [
    (20, 3, 7, range(0, 20), False), (20, 3, 50, range(5, 12), False), (30, 8, 130, range(3, 14), False),
    (9, 6, 33, range(0, 9), True), (12, 2, 64, range(10, 12), True), (25, 4, 128, range(8, 16), False),
])
@pytest.mark.parametrize("num_global,token_num_scale", [(0, False), (2, False), (3, True)])
def test_band_attention_equals_the_per_frame_fused_path(total, padding, tokens, query_frames, loop, num_global,
                                                        token_num_scale):
    """A chunk of query frames (a clip's first, middle or last, a ring's), its window's keys and the
    global keys, with phase biases: one FlexAttention call equals one fused call per query frame."""
    c = _case(total, padding, tokens, query_frames, loop, num_global)
    settings = dict(query_frames=query_frames, key_frames=c["context"], total_frames=total, scale=0.25,
                    local_bias=0.5, global_bias=2.0, token_num_scale=token_num_scale, loop=loop, tokens_per_frame=tokens)
    expected = dual_scope_attention(c["q"], c["k"], c["v"], c["kg"], c["vg"], padding=padding, chunk_size=1,
                                    split_invariant=False, **settings)
    got = band_attention(c["q"], c["k"], c["v"], c["kg"], c["vg"], left=c["left"], right=c["right"], **settings)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.unit
def test_band_attention_equals_the_dense_reference_over_a_whole_video():
    """One token per frame, the whole video as one chunk: the dense masked softmax of the tests'
    references (independent of the engine's window rules)."""
    torch.manual_seed(1)
    total, padding, top_k = 23, 3, 4
    q, k, v = (torch.randn(1, 2, total, 8, dtype=torch.float64) for _ in range(3))
    gidx = global_frame_indices(total, top_k)
    band = (torch.arange(total)[:, None] - torch.arange(total)[None, :]).abs() <= padding
    expected = dense_band_attention(q, k, v, band, gidx, 0.375, 0.7, -1.2, True)
    got = band_attention(q, k, v, k[..., gidx, :], v[..., gidx, :], query_frames=range(total), key_frames=range(total),
                         total_frames=total, left=padding, right=padding, scale=0.375, local_bias=0.7,
                         global_bias=-1.2, token_num_scale=True)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.unit
def test_on_meta_tensors_it_allocates_one_output_and_counts_the_visible_keys():
    """The planner's view: the FLOPs of the per-frame path (each query frame's window and the
    global keys, not the block mask's whole span), and working memory of the kernel's inputs and
    output: the chunk's span of keys and values with the global ones, and one output."""
    total, padding, tokens, query_frames = 40, 8, 1560 // 4, range(10, 20)
    c = _case(total, padding, tokens, query_frames, False, 4, dtype=torch.bfloat16)
    meta = {name: t.to("meta") for name, t in c.items() if torch.is_tensor(t)}
    settings = dict(query_frames=query_frames, key_frames=c["context"], total_frames=total, scale=0.1,
                    local_bias=0.0, global_bias=10.0, tokens_per_frame=tokens)
    flex = measure(lambda: band_attention(meta["q"], meta["k"], meta["v"], meta["kg"], meta["vg"], left=padding,
                                          right=padding, **settings))
    per_frame = measure(lambda: dual_scope_attention(meta["q"], meta["k"], meta["v"], meta["kg"], meta["vg"],
                                                     padding=padding, chunk_size=1, split_invariant=False, **settings))
    visible = sum(len(window(range(f, f + 1), padding, padding, total)) + 4 for f in query_frames) * tokens * tokens
    assert flex.flops == per_frame.flops == 4 * visible * 16 * 2 * 3
    output = c["q"].numel() * 2
    keys = 2 * (len(window(query_frames, padding, padding, total)) + 4) * tokens * 16 * 2 * 3 * 2
    assert output + keys <= flex.peak_bytes <= 1.1 * (output + keys)


@pytest.mark.unit
def test_flex_is_a_fused_kernel_choice():
    assert EngineConfig.model_validate({"attn": {"kernel": "flex"}, "split_invariant": False}).flex_on("cpu")
    assert not EngineConfig.model_validate({"attn": {"kernel": "flex"}}).flex_on("cpu")  # split-invariant CPU default
    assert not EngineConfig.model_validate({"attn": {"kernel": "sdpa"}}).flex_on("meta")
    assert EngineConfig.model_validate({"attn": {"kernel": "flex"}}).flex_on("cuda")
    # auto: FlexAttention where it is compiled (CUDA with Triton) and on meta tensors (the planner counts
    # what a GPU runs); the per-frame fused calls on CPU (there flex is the unfused reference)
    from video_infinity.engine.flex import flex_available

    fused = EngineConfig(split_invariant=False)
    assert fused.flex_on("meta") and not fused.flex_on("cpu")
    assert fused.flex_on("cuda") == flex_available("cuda")
    assert not EngineConfig().flex_on("cpu") and EngineConfig().flex_on("meta")
    with pytest.raises(ValueError, match="attn.kernel to auto or sdpa, or split_invariant to false"):
        EngineConfig.model_validate({"attn": {"kernel": "flex"}, "split_invariant": True})


@pytest.mark.unit
def test_the_planner_counts_a_flex_step_as_the_per_frame_step_plus_the_chunk_keys():
    """``video-infinity plan`` with ``attn.kernel: flex`` (meta device, real 1.3B widths, two layers,
    65 latent frames): the same FLOPs as the per-frame calls (FlexAttention skips the blocks outside
    the band), and a peak that differs by what each path holds at once: one chunk's key span copied
    beside the global keys against per-frame copies and outputs, well under the call's 10%."""
    from video_infinity.context import ClipContext
    from video_infinity.families.wan.plan import meta_transformer, step_measure
    from video_infinity.presets import resolve_engine

    model = meta_transformer(dict(attention_head_dim=128, num_layers=2, text_dim=4096, freq_dim=256,
                                  patch_size=(1, 2, 2), cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=1024, num_attention_heads=12, ffn_dim=8960, in_channels=16,
                                  out_channels=16), torch.bfloat16)
    measured = {}
    for kernel in ("sdpa", "flex"):
        engine = resolve_engine("wan")
        engine = EngineConfig.model_validate({**engine.model_dump(), "attn": {**engine.attn.model_dump(),
                                                                               "kernel": kernel}})
        measured[kernel] = step_measure(model, engine, ClipContext(total_frames=65), (60, 104), False,
                                        guidance=False)
    assert measured["flex"].flops == measured["sdpa"].flops
    assert abs(measured["flex"].peak_bytes - measured["sdpa"].peak_bytes) < 0.1 * measured["sdpa"].peak_bytes


@pytest.mark.unit
def test_flex_without_its_kernel_is_refused_when_the_engine_is_attached(monkeypatch):
    """A device where FlexAttention cannot run (CUDA without Triton; here faked for the CPU): one
    line naming the field, at ``parallelize``, before any step."""
    import video_infinity.families.wan.engine as wan_engine
    from video_infinity import ClipContext, parallelize
    from tiny_models import build_tiny_wan_transformer

    monkeypatch.setattr(wan_engine, "flex_available", lambda device: False)
    model = build_tiny_wan_transformer()
    with pytest.raises(ValueError, match=r"^attn.kernel: flex needs .* set attn.kernel to sdpa or auto$"):
        parallelize(model, {"attn": {"kernel": "flex"}, "split_invariant": False}, ClipContext(total_frames=5))
    parallelize(model, {"attn": {"kernel": "sdpa"}, "split_invariant": False}, ClipContext(total_frames=5)).remove()


@pytest.mark.unit
def test_auto_takes_the_per_frame_calls_on_cuda_without_triton(monkeypatch):
    """``attn.kernel: auto`` (the default) on a CUDA device where FlexAttention cannot be compiled: the
    per-frame fused calls, no error (only an explicit ``flex`` is refused)."""
    import video_infinity.engine.flex as flex

    monkeypatch.setattr(flex, "flex_available", lambda device: False)
    assert not EngineConfig(split_invariant=False).flex_on("cuda")
    monkeypatch.setattr(flex, "flex_available", lambda device: device == "cuda")
    assert EngineConfig(split_invariant=False).flex_on("cuda")
    assert EngineConfig.model_validate({"attn": {"kernel": "flex"}, "split_invariant": False}).flex_on("cuda")
