"""Band + global attention of many query frames in one FlexAttention call (the fused GPU path).

A DiT's latent frame holds many tokens (1,560 at Wan2.1 480x832), so a band window over several
query frames needs a (queries x keys) mask; without one the engine attends one query frame per fused
call, too small a call to fill a GPU (12 heads of 1,560 queries are 156 tiles of 128 rows for an
H200's 132 multiprocessors), and its phase biases, a per-key mask, keep torch off the flash kernel
(one H200, ``benchmarks/results/band_attention.json``: about 170 TFLOP/s for one layer, against about
415 for diffusers' whole dense call). FlexAttention (``torch.nn.attention.flex_attention``) runs
the whole chunk in one kernel: a block mask, built here from the frames' ranges at block level
(no (queries x keys) tensor is ever made), skips the key blocks outside every query's window and
the tokens of partial blocks are masked in the kernel; the phase biases and ``token_num_scale`` are
a score modification. The values that change between calls (where the chunk and its keys start,
the biases) are tensors, so one compiled kernel serves every chunk, layer and step.

It computes what :func:`~video_infinity.engine.attention.dual_scope_attention` computes without
``split_invariant``, up to float rounding (the scale of ``token_num_scale`` is applied to the
float32 score here, to the query there); it is not split-invariant (a row's key blocks start where
its call's keys start). On CUDA the kernel is compiled (``torch.compile``, Triton); elsewhere
torch's unfused reference implementation runs (it materialises the scores: for tests). On the meta
device (the planner) it allocates what the kernel allocates (output and a float32 log-sum-exp row
per query) and counts the FLOPs of the visible keys only.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..frames import window

logger = logging.getLogger(__name__)

BLOCK = 128
"""FlexAttention's default block size (queries and keys): the granularity of the block mask."""

__all__ = ["band_attention", "flex_available"]


def flex_available(device_type: str) -> bool:
    """Whether FlexAttention runs on a device of this type: CUDA needs Triton for the compiled
    kernel; on other devices torch's unfused reference runs (slow, for tests)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # torch < 2.5
        return False
    if device_type != "cuda":
        return callable(flex_attention)
    from torch.utils._triton import has_triton

    return has_triton()


@functools.cache
def _kernel(device_type: str) -> Callable[..., torch.Tensor]:
    """torch's ``flex_attention``, compiled on CUDA (one compiled kernel per process; shapes that
    vary between calls become dynamic after the first recompile, torch's default)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    logger.info("compiling the FlexAttention band kernel (once per process)")
    return torch.compile(flex_attention)


def _block_lists(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of True per row, the True columns first in ascending order) as (1, 1, rows[, cols])
    int32 tensors: BlockMask's layout."""
    counts = flags.sum(-1, dtype=torch.int32)
    order = torch.sort(flags.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return counts[None, None], order[None, None]


def band_block_mask(query_frames: range, key_frames: range, num_global_tokens: int, tokens: int, left: int,
                    right: int, device: torch.device) -> Any:
    """The BlockMask of a band window: query token i (frame ``query_frames.start + i // tokens``)
    sees local key token j < ``len(key_frames) * tokens`` (frame ``key_frames.start + j // tokens``,
    unwrapped in a loop) iff -left <= key frame - query frame <= right, and every global key token
    after them. Blocks where every pair is visible are "full" (no mask in the kernel)."""
    from torch.nn.attention.flex_attention import BlockMask

    num_q, num_local = len(query_frames) * tokens, len(key_frames) * tokens
    num_kv = num_local + num_global_tokens

    def bounds(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.arange(0, length, BLOCK, device=device)
        return first, torch.clamp(first + BLOCK, max=length) - 1

    q_first, q_last = bounds(num_q)
    k_first, k_last = bounds(num_kv)
    q_lo, q_hi = (query_frames.start + q_first // tokens)[:, None], (query_frames.start + q_last // tokens)[:, None]
    local_last = torch.clamp(k_last, max=num_local - 1)
    k_lo, k_hi = key_frames.start + k_first // tokens, key_frames.start + local_last // tokens
    has_local, has_global = k_first < num_local, k_last >= num_local
    # Some (query, key) pair of the two blocks is within the band / every pair is.
    some_band = (k_lo - q_hi <= right) & (k_hi - q_lo >= -left) & has_local
    all_band = (k_lo - q_hi >= -left) & (k_hi - q_lo <= right)  # on the block's local keys (globals: all seen)
    # A block cut by a sequence's end is left to the kernel's mask (never "full").
    whole = ((q_last - q_first + 1) == BLOCK)[:, None] & ((k_last - k_first + 1) == BLOCK)
    full = whole & (all_band | ~has_local)
    partial = (some_band | has_global) & ~full
    q0, k0, local_tokens = (_scalar(v, device) for v in (query_frames.start, key_frames.start, num_local))

    def visible(b, h, q_idx, kv_idx):
        distance = (k0 + kv_idx // tokens) - (q0 + q_idx // tokens)
        return (kv_idx >= local_tokens) | ((distance >= -left) & (distance <= right))

    # compute_q_blocks=False: no backward pass, so no transposed (per key block) lists.
    return BlockMask.from_kv_blocks(*_block_lists(partial), *_block_lists(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=visible, seq_lengths=(num_q, num_kv), compute_q_blocks=False)


def _scalar(value: float | int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A 0-dim tensor on ``device`` made there (a fill kernel): ``torch.tensor(value, device=...)``
    copies from the host and waits for every queued kernel, so the host cannot run ahead of the GPU
    (why FlexAttention lost the frame-chunked call at 6bae79b while it won per layer; made on the
    device, it won the call too: one H200 at 56d9a10, ``gpu_wan.json``)."""
    return torch.full((), value, dtype=dtype, device=device)


def band_attention(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    *,
    query_frames: range,
    key_frames: range,
    total_frames: int,
    left: int,
    right: int,
    scale: float,
    local_bias: float = 0.0,
    global_bias: float = 0.0,
    token_num_scale: bool = False,
    loop: bool = False,
    tokens_per_frame: int = 1,
) -> torch.Tensor:
    """Every query frame g of ``query_frames`` attends the local keys of frames u with -left <= u - g
    <= right (``key_frames``: unwrapped in a ``loop``; must hold the queries' windows) and all
    global keys, in one FlexAttention call. Shapes as ``dual_scope_attention``: ``q`` (..., Fq*T,
    d) heads-first, keys and values (..., Fk*T, d) and (..., G*T, d)."""
    tokens = tokens_per_frame
    if len(query_frames) * tokens != q.shape[-2] or len(key_frames) * tokens != k_local.shape[-2]:
        raise ValueError("query_frames/key_frames (times tokens_per_frame) do not match the tensors' token counts")
    span = window(query_frames, left, right, total_frames, loop)
    if not (key_frames.start <= span.start and span.stop <= key_frames.stop):
        raise ValueError(f"key_frames {key_frames} lack frames of the windows of queries {query_frames}")
    at = (span.start - key_frames.start) * tokens
    local = slice(at, at + len(span) * tokens)
    num_global = k_global.shape[-2]
    keys, values = (torch.cat([t[..., local, :], g], dim=-2) for t, g in ((k_local, k_global), (v_local, v_global)))
    if q.device.type == "meta":
        windows = [len(window(range(f, f + 1), left, right, total_frames, loop)) for f in query_frames]
        return _meta_attention(q, keys, values, [n * tokens + num_global for n in windows], tokens)
    device = q.device
    block_mask = band_block_mask(query_frames, span, num_global, tokens, left, right, device)
    biased = bool(num_global) and local_bias != global_bias
    score_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # the kernel's score dtype
    if biased:
        local_tokens = _scalar(len(span) * tokens, device)
        bias_local, bias_global = (_scalar(b, device, score_dtype) for b in (local_bias, global_bias))
    if token_num_scale:
        # log(keys seen) / log(16) per query frame: its window's (clipped) frames and the global keys,
        # computed on the device (no copy from the host).
        frames = torch.arange(query_frames.start, query_frames.stop, device=device)
        seen = torch.full_like(frames, left + right + 1) if loop else \
            torch.clamp(frames + right + 1, max=total_frames) - torch.clamp(frames - left, min=0)
        factor = torch.log((seen * tokens + num_global).to(torch.float64)).div_(math.log(16.0)).to(score_dtype)

    def score_mod(score, b, h, q_idx, kv_idx):
        if token_num_scale:
            score = score * factor[q_idx // tokens]
        if biased:
            score = score + torch.where(kv_idx >= local_tokens, bias_global, bias_local)
        return score

    return _kernel(device.type)(q, keys, values, score_mod=score_mod if token_num_scale or biased else None,
                                block_mask=block_mask, scale=scale)


def _meta_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: list[int],
                    tokens: int) -> torch.Tensor:
    """On meta tensors: the kernel's allocations (output, float32 log-sum-exp), and each query
    frame's FLOPs over its ``visible`` keys, counted by a (meta) fused attention call per frame
    whose output is dropped at once."""
    out = q.new_empty(*q.shape[:-1], values.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    for index, count in enumerate(visible):
        F.scaled_dot_product_attention(q[..., index * tokens : (index + 1) * tokens, :], keys[..., :count, :],
                                       values[..., :count, :])
    del lse
    return out
