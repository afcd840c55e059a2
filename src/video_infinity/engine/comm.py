"""The engine's one communication module: every collective of a generation, on a ``ClipContext``.

* the halo exchange (:func:`start_exchange`): point-to-point, each rank sends its neighbours the
  frames their windows reach and the global frames' owners send those; the rules (who sends what)
  live in :mod:`video_infinity.frames`;
* bringing frames to rank 0 (:func:`gather_frames`, :func:`stream_to_rank0`): latents, checkpoints
  and the decoded video, in frame order;
* :func:`broadcast_from_rank0`: something computed once (text embeddings) sent to every rank.

At world size 1 nothing is sent (the exchange reduces to slicing), so one process runs the same code.
The whole-video GroupNorm's all-reduce sits with its math in :mod:`.norm`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..context import ClipContext, FrameLayout
from ..frames import owners, ring_offset, window, window_transfer_plan

__all__ = ["PendingFrames", "broadcast_from_rank0", "comm_device", "gather_frames", "start_exchange", "stream_to_rank0"]


def _frames(x: torch.Tensor, dim: int, frames: range, offset: int) -> torch.Tensor:
    return x.narrow(dim, frames.start - offset, len(frames))


@dataclass
class PendingFrames:
    """Frames in flight from ``start_exchange``; ``wait()`` returns them once they have arrived.

    The caller computes something useful (e.g. the query projection) between the two.
    """

    x: torch.Tensor
    dim: int
    layout: FrameLayout
    span: range
    global_frames: list[int]
    requests: list
    window_parts: list[tuple[int, torch.Tensor]]
    """(position in ``span``'s coordinates, frames): this rank's own pieces and those in flight."""
    global_parts: dict[int, torch.Tensor]
    global_positions: dict[int, list[int]]
    """Per source rank, which entries of ``global_frames`` its part holds (the rest lie in the window)."""
    out: torch.Tensor | None = None
    """The window's frames, when the caller gave their tensor (``start_exchange(out=...)``)."""

    def wait(self) -> tuple[torch.Tensor, range, torch.Tensor]:
        """(frames of ``span`` along ``dim``, ``span``, the global frames in the requested order)."""
        for request in self.requests:
            request.wait()
        pieces = sorted(self.window_parts, key=lambda item: item[0])
        if self.out is not None:
            window_frames = self.out
            for at, piece in pieces:  # received in place, or this rank's own frames (in place, or across a wrap)
                target = window_frames.narrow(self.dim, at - self.span.start, piece.shape[self.dim])
                if piece.data_ptr() != target.data_ptr():
                    target.copy_(piece)
        else:
            window_frames = pieces[0][1] if len(pieces) == 1 else torch.cat([p for _, p in pieces], dim=self.dim)
        by_position: list[torch.Tensor | None] = [None] * len(self.global_frames)
        for rank, positions in self.global_positions.items():
            for slot, position in enumerate(positions):
                by_position[position] = self.global_parts[rank].narrow(self.dim, slot, 1)
        for position, frame in enumerate(self.global_frames):  # not sent: this rank's window holds it
            if by_position[position] is None:
                offset = ring_offset(self.span, frame, self.layout.total_frames)
                by_position[position] = window_frames.narrow(self.dim, offset, 1)
        if by_position:
            global_frames = torch.cat(by_position, dim=self.dim)
        else:
            shape = list(self.x.shape)
            shape[self.dim] = 0
            global_frames = self.x.new_empty(shape)
        return window_frames, self.span, global_frames


def start_exchange(
    x: torch.Tensor,
    dim: int,
    layout: FrameLayout,
    left: int,
    right: int,
    ctx: ClipContext,
    global_frames: list[int] = (),
    kind: str = "halo",
    loop: bool = False,
    out: torch.Tensor | None = None,
) -> PendingFrames:
    """Start moving this rank's halo window and the ``global_frames`` in one point-to-point round.

    ``x`` holds the owned frames along ``dim``. The window ``[start-left, stop+right)`` is clipped
    at the true ends of the video, so the caller gets exactly the frames that exist; they come from
    whichever ranks own them (several ranks when clips are shorter than the halo). With ``loop`` the
    frames are on a ring: the window is not clipped but unwrapped (``wait()``'s span may start below
    0 or end past the last frame; its position u holds frame u mod total_frames, fetched from its
    owner, which may be this rank, also on one process). Each global frame goes from its owner to
    every other rank whose window does not already hold it. Every rank must call this with the same
    arguments (but ``x``), so that all of them post matching messages in the same order.

    ``out``: a tensor for the whole window (``span`` along ``dim``) of which ``x`` is the owned part, in
    place; the neighbours' frames are received straight into it and ``wait()`` returns it (no copy of
    the window; a DiT's keys and values are the largest thing a layer keeps).
    """
    owned = layout.owned
    span = window(owned, left, right, layout.total_frames, loop)
    if out is not None and (out.shape[dim] != len(span) or
                            x.data_ptr() != out.narrow(dim, owned.start - span.start, len(owned)).data_ptr()):
        raise ValueError("start_exchange: out must hold the window's frames, x being its owned frames in place")
    global_frames = list(global_frames)
    partition = list(layout.partition)
    positions = owners(partition, global_frames) if global_frames else []
    ops: list[dist.P2POp] = []
    window_parts: list[tuple[int, torch.Tensor]] = [(owned.start, x)]
    global_parts: dict[int, torch.Tensor] = {}

    def buffer(frames: int, at: int | None = None) -> torch.Tensor:
        if out is not None and at is not None:  # straight into the window when it can take a receive
            place = out.narrow(dim, at - span.start, frames)
            if place.is_contiguous():
                return place
        shape = list(x.shape)
        shape[dim] = frames
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    def send(payload: torch.Tensor, peer: int, stat: str) -> None:
        ops.append(dist.P2POp(dist.isend, payload, ctx.global_rank(peer), ctx.group))
        ctx.stats.add(stat, payload.numel() * payload.element_size())

    if (ctx.distributed or loop) and (left or right):
        # Not only when this rank's own window reaches past its clip: with a one-sided window
        # (e.g. left only) the first rank needs nothing but must still send. In a loop one
        # process also has a window past its clip: its own frames across the wrap.
        # Messages between one pair of ranks match in posting order: window first, then globals.
        plan = window_transfer_plan(partition, layout.rank, left, right, loop)
        window_parts = [(piece.at, _frames(x, dim, piece.frames, owned.start)) for piece in plan.local]
        for transfer in plan.sends:
            send(_frames(x, dim, transfer.frames, owned.start).contiguous(), transfer.peer, kind)
        for transfer in plan.recvs:
            window_parts.append((transfer.at, buffer(len(transfer.frames), transfer.at)))
            ops.append(dist.P2POp(dist.irecv, window_parts[-1][1], ctx.global_rank(transfer.peer), ctx.group))

    def outside_window(rank: int, chosen: list[int]) -> list[int]:
        """The entries of ``chosen`` whose global frame ``rank``'s window does not hold."""
        span_of_rank = window(partition[rank], left, right, layout.total_frames, loop)
        return [p for p in chosen if ring_offset(span_of_rank, global_frames[p], layout.total_frames) is None]

    received: dict[int, list[int]] = {}  # this rank's own global frames lie in its window
    if ctx.distributed:
        for peer, peer_positions in enumerate(positions):
            if peer == layout.rank:
                continue
            wanted = outside_window(peer, positions[layout.rank])
            if wanted:
                index = torch.tensor([global_frames[p] - owned.start for p in wanted], device=x.device)
                send(x.index_select(dim, index), peer, "global")
            needed = outside_window(layout.rank, peer_positions)
            if needed:
                global_parts[peer] = buffer(len(needed))
                received[peer] = needed
                ops.append(dist.P2POp(dist.irecv, global_parts[peer], ctx.global_rank(peer), ctx.group))
    requests = dist.batch_isend_irecv(ops) if ops else []
    return PendingFrames(x, dim, layout, span, global_frames, requests, window_parts, global_parts, received, out)


# ---------------------------------------------------------------------- to rank 0, from rank 0
def comm_device(ctx: ClipContext, device: torch.device) -> torch.device:
    """Where tensors must be to travel: NCCL moves CUDA tensors only, gloo CPU tensors."""
    return device if ctx.distributed and dist.get_backend(ctx.group) == "nccl" else torch.device("cpu")


def gather_frames(tensor: torch.Tensor, ctx: ClipContext, device: torch.device, dim: int = 2) -> torch.Tensor | None:
    """The whole video's ``tensor`` (frames along ``dim``) on rank 0, on the CPU; None on the other ranks."""
    local = tensor.to(comm_device(ctx, device)).contiguous()
    if not ctx.distributed:
        return local.cpu()
    if ctx.rank != 0:
        dist.send(local, dst=ctx.global_rank(0), group=ctx.group)
        return None
    parts = [local]
    for rank in range(1, ctx.world_size):
        shape = list(local.shape)
        shape[dim] = len(ctx.layout.partition[rank])
        buffer = torch.empty(shape, dtype=local.dtype, device=local.device)
        dist.recv(buffer, src=ctx.global_rank(rank), group=ctx.group)
        parts.append(buffer)
    return torch.cat(parts, dim=dim).cpu()


def stream_to_rank0(chunks: Iterable[torch.Tensor], ctx: ClipContext, device: torch.device,
                    dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Rank 0 yields its own chunks, then every other rank's, in rank order (so in frame order); the
    other ranks send theirs and yield nothing. Each chunk is preceded by its shape (any chunking works)."""
    if not ctx.distributed:
        yield from chunks
        return
    where = comm_device(ctx, device)
    if ctx.rank != 0:
        for chunk in chunks:
            chunk = chunk.to(where, dtype).contiguous()
            dist.send(torch.tensor([chunk.dim(), *chunk.shape, *[0] * (7 - chunk.dim())], device=where),
                      dst=ctx.global_rank(0), group=ctx.group)
            dist.send(chunk, dst=ctx.global_rank(0), group=ctx.group)
        dist.send(torch.zeros(8, dtype=torch.int64, device=where), dst=ctx.global_rank(0), group=ctx.group)
        return
    for chunk in chunks:
        yield chunk.to(dtype)
    for rank in range(1, ctx.world_size):
        while True:
            header = torch.empty(8, dtype=torch.int64, device=where)
            dist.recv(header, src=ctx.global_rank(rank), group=ctx.group)
            ndim = int(header[0])
            if ndim == 0:
                break
            buffer = torch.empty([int(s) for s in header[1 : 1 + ndim]], dtype=dtype, device=where)
            dist.recv(buffer, src=ctx.global_rank(rank), group=ctx.group)
            yield buffer


def max_over_ranks(ctx: ClipContext, value: float, device: torch.device) -> float:
    """The largest of every rank's ``value`` (each rank calls it), exactly (float64)."""
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=comm_device(ctx, device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ctx.group)
    return float(tensor.item())


def broadcast_from_rank0(
    ctx: ClipContext, produce: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """``produce()`` on rank 0 only, sent to every rank (others never call it)."""
    if ctx.rank == 0:
        tensor = produce().to(device=device, dtype=dtype).contiguous()
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"rank 0 produced shape {tuple(tensor.shape)}, the other ranks expect {tuple(shape)}")
    else:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    if ctx.distributed:
        dist.broadcast(tensor, src=ctx.global_rank(0), group=ctx.group)
    return tensor
