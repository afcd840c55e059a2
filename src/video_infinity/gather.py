"""Bring every rank's frames to rank 0: whole tensors (latents, checkpoints) or a stream of chunks
(decoded video), in frame order. Point-to-point sends; no-ops in a single process."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from .context import ClipContext


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
