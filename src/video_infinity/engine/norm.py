"""GroupNorm whose statistics cover the whole video although each rank holds one clip.

Each rank computes per-(sample, group) count, mean and sum of squared deviations over the frames it
owns; one all-gather and Chan's parallel combination give the statistics of the whole video. Unlike
averaging per-rank means (wrong for uneven clips) this is exact. With ``split_invariant`` the sums
are in float64, so the rounded statistics are the same for every split of the frames, one process
included (which then takes the same path instead of the native kernel).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..context import ClipContext


def group_moments(x: torch.Tensor, num_groups: int, split_invariant: bool = True) -> torch.Tensor:
    """Per (sample, group): stacked (count, mean, M2) in float64, shape (3, N, G). ``x`` is (N, C, ...).

    ``split_invariant``: summed in float64, so that however the frames are split over ranks the
    statistics round to the same float32 (or half) values and the video is the same bit for bit.
    The sums of values and of squares are taken in ``x``'s own memory layout (often a permuted view
    of a frames-first tensor: no reordering copy) and M2 = sum of squares - sum * mean; in float64
    the cancellation costs about 1e-16 * (1 + mean^2 / variance) relative, far below float32's
    resolution. Otherwise summed in the input's precision (at least float32) with Welford's
    algorithm (``var_mean``), which needs no float64 copy.
    """
    n = x.shape[0]
    if split_invariant:
        grouped = x.unflatten(1, (num_groups, -1)).double()  # a view split, then one float64 copy
        dims = tuple(range(2, grouped.dim()))
        count = grouped[0, 0].numel()
        total = grouped.sum(dims)
        squares = torch.linalg.vector_norm(grouped, dim=dims).square()
        mean = total / count
        m2 = (squares - total * mean).clamp_min(0.0)
        return torch.stack([torch.full_like(mean, float(count)), mean, m2])
    flat = x.reshape(n, num_groups, -1)
    flat = flat.float() if flat.dtype != torch.float64 else flat
    count = flat.shape[-1]
    var, mean = torch.var_mean(flat, dim=-1, correction=0)
    mean = mean.double()
    return torch.stack([torch.full_like(mean, float(count)), mean, var.double() * count])


def combine_moments(moments: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-part (count, mean, M2) stacks into the whole's (mean, biased variance)."""
    count, mean, m2 = moments[0].unbind(0)
    for part in moments[1:]:
        n_b, mean_b, m2_b = part.unbind(0)
        total = count + n_b
        delta = mean_b - mean
        safe_total = total.clamp_min(1.0)
        mean = mean + delta * (n_b / safe_total)
        m2 = m2 + m2_b + delta * delta * (count * n_b / safe_total)
        count = total
    return mean, m2 / count.clamp_min(1.0)


def video_group_statistics(
    own: torch.Tensor, norm: nn.GroupNorm, ctx: ClipContext, scope: str = "video", split_invariant: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, group) mean and biased variance, float64, of the whole video (``scope="video"``)
    or of this rank's clip (``"clip"``); ``own`` holds only this rank's frames."""
    moments = group_moments(own, norm.num_groups, split_invariant)
    if scope == "video" and ctx.distributed:
        parts = [torch.empty_like(moments) for _ in range(ctx.world_size)]
        dist.all_gather(parts, moments, group=ctx.group)
        ctx.stats.add("norm", moments.numel() * moments.element_size() * (ctx.world_size - 1))
        return combine_moments(parts)
    return combine_moments([moments])


def apply_group_norm(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor,
                     memory_order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Normalise ``x`` (N, C, ...) with the given per-(sample, group) statistics and ``norm``'s affine.

    ``memory_order``: the output's dimensions from outermost to innermost in memory (a permutation of
    ``x``'s), so that a consumer's reshape to that order is a view; by default ``x``'s layout.
    """
    n, c = x.shape[:2]
    g = norm.num_groups
    inv_std = torch.rsqrt(var + norm.eps)
    # Fold mean, std and the affine weights into one per-(sample, channel) scale and shift.
    scale = inv_std.repeat_interleave(c // g, dim=1)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double() + norm.bias.double()
    view = (n, c) + (1,) * (x.dim() - 2)
    out = None
    if memory_order is not None:
        out = x.new_empty([x.shape[d] for d in memory_order]).permute([memory_order.index(d) for d in range(x.dim())])
    return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype), out=out)


def video_group_norm(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    ctx: ClipContext,
    scope: str = "video",
    owned: slice | None = None,
    frame_dim: int = 2,
    split_invariant: bool = True,
    memory_order: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Apply ``norm`` to ``x`` (N, C, F, ...) with statistics over the owned frames of every rank.

    ``owned`` selects this rank's own frames along ``frame_dim`` when ``x`` also carries halo
    frames: those are normalised too, but never counted. ``scope="clip"`` uses this rank's
    frames only, as the original method did. ``split_invariant``: see :func:`group_moments`.
    ``memory_order``: see :func:`apply_group_norm` (not for the native kernel's path).
    """
    if owned is None and (scope == "clip" or not (ctx.distributed or split_invariant)):
        # The statistics are over the frames held: the native kernel computes exactly that.
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    own = x if owned is None else x[(slice(None),) * frame_dim + (owned,)]
    return apply_group_norm(x, norm, *video_group_statistics(own, norm, ctx, scope, split_invariant), memory_order)
