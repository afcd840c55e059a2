"""Thin collectives that move frames between ranks. The rules (who sends what) live in ``frames``.

At world size 1 nothing is sent and the functions reduce to slicing, so the single-process path runs
the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context import ClipContext, FrameLayout
from .frames import global_frame_indices, owners, window, window_transfer_plan

__all__ = ["exchange_halo", "gather_frames", "global_frame_indices"]


def _frames(x: torch.Tensor, dim: int, frames: range, offset: int) -> torch.Tensor:
    return x.narrow(dim, frames.start - offset, len(frames))


def exchange_halo(
    x: torch.Tensor, dim: int, layout: FrameLayout, left: int, right: int, ctx: ClipContext, kind: str = "halo"
) -> tuple[torch.Tensor, range]:
    """Return this rank's frames widened by up to ``left``/``right`` neighbour frames, and their global range.

    ``x`` holds the owned frames along ``dim``. The window is clipped at the true ends of the video,
    so the caller sees exactly the frames that exist. Frames come by point-to-point messages from
    whichever ranks own them (several ranks when clips are shorter than the halo).
    """
    owned = layout.owned
    span = window(owned, left, right, layout.total_frames)
    if len(span) == len(owned):
        return x, span
    plan = window_transfer_plan(list(layout.partition), layout.rank, left, right)
    ops, received = [], []
    for send in plan.sends:
        payload = _frames(x, dim, send.frames, owned.start).contiguous()
        ops.append(dist.P2POp(dist.isend, payload, ctx.global_rank(send.peer), ctx.group))
        ctx.stats.add(kind, payload.numel() * payload.element_size())
    for recv in plan.recvs:
        shape = list(x.shape)
        shape[dim] = len(recv.frames)
        buffer = torch.empty(shape, dtype=x.dtype, device=x.device)
        ops.append(dist.P2POp(dist.irecv, buffer, ctx.global_rank(recv.peer), ctx.group))
        received.append((recv.frames.start, buffer))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    pieces = sorted(received + [(owned.start, x)], key=lambda item: item[0])
    return torch.cat([piece for _, piece in pieces], dim=dim), span


def gather_frames(x: torch.Tensor, dim: int, layout: FrameLayout, frames: list[int], ctx: ClipContext) -> torch.Tensor:
    """Frames at global indices ``frames`` (in that order) on every rank, gathered from their owners.

    One all-gather; each rank contributes the frames it owns, padded to the largest contribution
    because all-gather needs equal sizes.
    """
    owned = layout.owned
    if not frames:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_empty(shape)
    if not ctx.distributed:
        index = torch.tensor([f - owned.start for f in frames], device=x.device)
        return x.index_select(dim, index)
    positions = owners(list(layout.partition), frames)
    width = max(len(p) for p in positions)
    mine = positions[layout.rank]
    shape = list(x.shape)
    shape[dim] = width
    contribution = x.new_zeros(shape)
    if mine:
        index = torch.tensor([frames[p] - owned.start for p in mine], device=x.device)
        contribution.narrow(dim, 0, len(mine)).copy_(x.index_select(dim, index))
    ctx.stats.add("global", contribution.numel() * contribution.element_size() * (ctx.world_size - 1))
    gathered = [torch.empty_like(contribution) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, contribution, group=ctx.group)
    result = [None] * len(frames)
    for rank, pos_list in enumerate(positions):
        for slot, pos in enumerate(pos_list):
            result[pos] = gathered[rank].narrow(dim, slot, 1)
    return torch.cat(result, dim=dim)
