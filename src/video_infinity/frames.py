"""Pure functions on global frame indices: clip partition, windows, global frames, transfer plans.

Frame ranges are Python ``range`` objects with step 1. Nothing here touches tensors or processes,
so every rule about who owns and who needs which frame is testable in one process.
"""

from __future__ import annotations

from dataclasses import dataclass


def partition_frames(total_frames: int, world_size: int) -> list[range]:
    """Split ``total_frames`` into ``world_size`` contiguous clips whose sizes differ by at most one.

    The first ``total_frames % world_size`` clips get the extra frame.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if total_frames < world_size:
        raise ValueError(
            f"total_frames ({total_frames}) must be >= the number of ranks ({world_size}): every rank needs a frame"
        )
    base, extra = divmod(total_frames, world_size)
    clips, start = [], 0
    for rank in range(world_size):
        size = base + (1 if rank < extra else 0)
        clips.append(range(start, start + size))
        start += size
    return clips


def intersect(a: range, b: range) -> range:
    """Intersection of two contiguous ranges (empty range if disjoint)."""
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return range(start, max(start, stop))


def window(clip: range, left: int, right: int, total_frames: int) -> range:
    """The clip widened by ``left``/``right`` frames, clipped to the video."""
    return range(max(0, clip.start - left), min(total_frames, clip.stop + right))


def global_frame_indices(total_frames: int, count: int) -> list[int]:
    """``count`` distinct frame indices spread evenly over the whole video (centres of equal bins).

    Depends only on the video length, never on the number of ranks.
    """
    count = max(0, min(count, total_frames))
    return [((2 * j + 1) * total_frames) // (2 * count) for j in range(count)]


@dataclass(frozen=True)
class Transfer:
    """Frames ``frames`` (global indices) move between this rank and ``peer``."""

    peer: int
    frames: range


@dataclass(frozen=True)
class TransferPlan:
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]


def window_transfer_plan(partition: list[range], rank: int, left: int, right: int) -> TransferPlan:
    """Point-to-point messages so that every rank holds its window ``[start-left, stop+right)``.

    Every rank applies the same rule, so each can compute what its peers need from it. Works for
    clips shorter than the window: the missing frames then come from several ranks.
    """
    total = partition[-1].stop
    mine = partition[rank]
    sends, recvs = [], []
    for peer, theirs in enumerate(partition):
        if peer == rank:
            continue
        give = intersect(window(theirs, left, right, total), mine)
        if len(give):
            sends.append(Transfer(peer, give))
        take = intersect(window(mine, left, right, total), theirs)
        if len(take):
            recvs.append(Transfer(peer, take))
    return TransferPlan(tuple(sends), tuple(recvs))


def owners(partition: list[range], frames: list[int]) -> list[list[int]]:
    """For each rank, the positions in ``frames`` of the frames that rank owns."""
    result: list[list[int]] = [[] for _ in partition]
    for pos, frame in enumerate(frames):
        for rank, clip in enumerate(partition):
            if frame in clip:
                result[rank].append(pos)
                break
        else:
            raise ValueError(f"frame {frame} is outside the video (0..{partition[-1].stop - 1})")
    return result
