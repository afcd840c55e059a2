"""Pure functions on global frame indices: clip partition, windows, global frames, transfer plans.

Frame ranges are Python ``range`` objects with step 1. Nothing here touches tensors or processes,
so every rule about who owns and who needs which frame is testable in one process.

Looping videos (``loop=True``) put the frames on a ring. A window is then given in *unwrapped*
coordinates: the contiguous span ``[start - left, stop + right)`` is not clipped at the video's ends,
and its position ``u`` holds the video's frame ``u mod total_frames`` (so ``-1`` is the last frame,
``total_frames`` the first). The math downstream runs on that span as on a video without ends.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def window(clip: range, left: int, right: int, total_frames: int, loop: bool = False) -> range:
    """The clip widened by ``left``/``right`` frames, clipped to the video; in a ``loop``, not
    clipped (unwrapped coordinates: position u is frame u mod ``total_frames``)."""
    if loop:
        return range(clip.start - left, clip.stop + right)
    return range(max(0, clip.start - left), min(total_frames, clip.stop + right))


def attention_reach(padding: int, total_frames: int, loop: bool = False) -> tuple[int, int]:
    """(frames before, frames after) each query frame of a local window of ``padding`` sees.

    Without a loop: ``padding`` each side, at most ``total_frames - 1`` (the window is then clipped at
    the video's ends). In a loop a window never holds a frame twice: while ``2 * padding + 1 <=
    total_frames`` it is ``padding`` each side, otherwise every frame exactly once, taken as
    ``total_frames // 2`` frames back and ``(total_frames - 1) // 2`` forward (one more back than
    forward for an even count). The same for every frame, so the ring has no distinguished frame
    and rolling the video rolls the result.
    """
    if not loop:
        padding = min(padding, total_frames - 1)
        return padding, padding
    if 2 * padding + 1 <= total_frames:
        return padding, padding
    return total_frames // 2, (total_frames - 1) // 2


def ring_offset(span: range, frame: int, total_frames: int) -> int | None:
    """Offset in ``span`` of the first position holding video frame ``frame`` (None if none does).

    ``span`` is a window as :func:`window` returns it, looping or not: a span inside the video holds
    frame f only at position f, an unwrapped one at every position congruent to f.
    """
    offset = (frame - span.start) % total_frames
    return offset if offset < len(span) else None


def global_frame_indices(total_frames: int, count: int, shift: int = 0) -> list[int]:
    """``count`` distinct frame indices spread evenly over the whole video (centres of equal bins),
    each moved ``shift`` frames on around the video (modulo ``total_frames``), in ascending order.

    ``shift`` is the denoising step's index for rotating global frames (``attn.global_frames``:
    ``"rotating"``), 0 for fixed ones. Depends only on the video length, ``count`` and ``shift``,
    never on the number of ranks.
    """
    count = max(0, min(count, total_frames))
    fixed = [((2 * j + 1) * total_frames) // (2 * count) for j in range(count)]
    if not shift:
        return fixed
    return sorted((frame + shift) % total_frames for frame in fixed)


def clipped_offsets(query_frame: int, key_frames: Iterable[int], clip: int | None) -> list[int]:
    """Temporal rotary offsets of ``key_frames`` (positions, unwrapped in a loop) as seen from
    ``query_frame``: ``clamp(k - query_frame, -clip, clip)``, sign kept; the plain ``k - query_frame``
    with ``clip`` None. (``attn.rotary_clip``: distances beyond the trained range read as ``clip``.)"""
    if clip is None:
        return [k - query_frame for k in key_frames]
    return [max(-clip, min(clip, k - query_frame)) for k in key_frames]


@dataclass(frozen=True)
class Transfer:
    """Frames ``frames`` (video indices) move between this rank and ``peer``; in the receiver's
    window they sit from position ``at`` on (unwrapped coordinates; ``frames.start`` without a loop)."""

    peer: int
    frames: range
    at: int


@dataclass(frozen=True)
class TransferPlan:
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]
    local: tuple[Transfer, ...] = ()
    """Pieces of this rank's window that it owns itself (its clip; in a loop, also copies across
    the wrap), in window order, with ``peer`` = this rank."""


def window_pieces(partition: list[range], clip_rank: int, left: int, right: int, loop: bool = False) -> list[Transfer]:
    """The window of rank ``clip_rank``, in order, cut into pieces of consecutive video frames that
    one rank owns: ``Transfer(owner, video frames, position in the window)``."""
    total = partition[-1].stop
    span = window(partition[clip_rank], left, right, total, loop)
    pieces = []
    lap_start = span.start - span.start % total  # first multiple of total_frames at or before the span
    for lap in range(lap_start, span.stop, total):
        lap_span = intersect(span, range(lap, lap + total))
        for owner, clip in enumerate(partition):
            frames = intersect(range(lap_span.start - lap, lap_span.stop - lap), clip)
            if len(frames):
                pieces.append(Transfer(owner, frames, frames.start + lap))
    return pieces


def window_transfer_plan(partition: list[range], rank: int, left: int, right: int, loop: bool = False) -> TransferPlan:
    """Point-to-point messages so that every rank holds its window ``[start-left, stop+right)``
    (clipped to the video, or in a ``loop`` unwrapped across its ends).

    Every rank applies the same rule, so each can compute what its peers need from it. Works for
    clips shorter than the window: the missing frames then come from several ranks (in a loop,
    possibly the same frames twice, at two positions of a window longer than the video). Sends to
    one peer are listed in the order of that peer's window, which is the order it posts its receives.
    """
    sends, recvs, local = [], [], []
    for peer in range(len(partition)):
        for piece in window_pieces(partition, peer, left, right, loop):
            if peer != rank and piece.peer == rank:
                sends.append(Transfer(peer, piece.frames, piece.at))
            elif peer == rank:
                (local if piece.peer == rank else recvs).append(piece)
    return TransferPlan(tuple(sends), tuple(recvs), tuple(local))


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


def latent_frame_count(num_frames: int, temporal_compression: int = 4) -> int:
    """Latent frames of a ``num_frames`` video under a causal video VAE that keeps the first frame and
    compresses every later ``temporal_compression`` frames into one (Wan): (num_frames - 1) / 4 + 1;
    other counts are an error naming the two nearest valid counts."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression:
        below = max(1, num_frames - (num_frames - 1) % temporal_compression)
        above = below + temporal_compression
        raise ValueError(
            f"num_frames: Wan videos have {temporal_compression}k+1 frames; {num_frames} is not one, "
            f"use {below} or {above}"
        )
    return (num_frames - 1) // temporal_compression + 1
