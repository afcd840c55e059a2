"""Windowed temporal attention for motion modules trained on short clips (AnimateDiff): rules and math.

AnimateDiff's motion modules add an absolute sinusoidal position embedding to every frame before
temporal attention, and were trained on clips of ``L`` frames (16): a frame at position 40 is
something the model never saw. So over a long video:

* query frames are grouped in blocks of ``B`` consecutive frames of the whole video (block b holds
  frames ``[bB, (b+1)B)``, the last one possibly shorter);
* each block attends a window of ``L`` frames around it (centred, shifted inwards at the ends of the
  video), whose frames take window-relative positions ``0..L-1`` -- the queries of the block
  included, so every position any query or key ever gets is one the model was trained on;
* plus the global frames (fixed indices spread over the whole video) that lie outside that window,
  with the nearest position the window has (0 before it, ``L-1`` after it); a global frame inside
  the window is already one of its keys and is not added twice.

Positions enter through the projections only: ``to_k(x + p) = to_k(x) + W_k p`` (the projections are
affine), so keys, values and queries are projected ONCE per frame and each window adds the per-position
rows ``W p`` (an (L, inner) table computed per call) -- the cost of re-projecting each frame for every
window that holds it (``L / B`` times the key/value projections) reduces to one addition per element.
Nothing here depends on how the video is split over ranks: windows, blocks and global frames are
functions of the whole video's length only. With ``T <= L`` there is one window, the whole video,
positions ``0..T-1``: exactly the unmodified model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MotionWindows:
    """Blocks of query frames and the key window of each, for one video of ``total_frames`` frames."""

    total_frames: int
    window_frames: int
    """``L``: frames per key window (at most the video's length)."""
    block_frames: int
    """``B``: query frames per block (at most ``window_frames``)."""

    @classmethod
    def for_video(cls, total_frames: int, window_frames: int, block_frames: int) -> "MotionWindows":
        if total_frames < 1:
            raise ValueError(f"total_frames must be >= 1, got {total_frames}")
        if window_frames < 1 or block_frames < 1:
            raise ValueError(f"window_frames and block_frames must be >= 1, got {window_frames}, {block_frames}")
        window = min(window_frames, total_frames)
        return cls(total_frames, window, min(block_frames, window))

    @property
    def num_blocks(self) -> int:
        return -(-self.total_frames // self.block_frames)

    def block(self, index: int) -> range:
        start = index * self.block_frames
        return range(start, min(start + self.block_frames, self.total_frames))

    def blocks_overlapping(self, frames: range) -> range:
        """Indices of the blocks holding any of ``frames``."""
        return range(frames.start // self.block_frames, (frames.stop - 1) // self.block_frames + 1)

    def window(self, index: int) -> range:
        """The key window of block ``index``: ``L`` frames with the block in the middle, inside the video."""
        start = index * self.block_frames - (self.window_frames - self.block_frames) // 2
        start = max(0, min(start, self.total_frames - self.window_frames))
        return range(start, start + self.window_frames)

    def halo(self, partition: list[range] | tuple[range, ...]) -> tuple[int, int]:
        """(left, right) frames beyond its clip that a rank needs, the largest over all ranks' clips.

        The same for every rank (each can compute its peers' needs from it, as the point-to-point
        exchange requires), and only as wide as the widest real need: 0 on one process.
        """
        left = right = 0
        for clip in partition:
            blocks = self.blocks_overlapping(clip)
            left = max(left, clip.start - self.window(blocks[0]).start)
            right = max(right, self.window(blocks[-1]).stop - clip.stop)
        return left, right

    def global_position(self, frame: int, window: range) -> int:
        """The window-relative position a global frame's key takes: its own inside the window, else the nearest end."""
        return max(0, min(frame - window.start, self.window_frames - 1))


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    *,
    scale: float,
    local_bias: float = 0.0,
    global_bias: float = 0.0,
    global_visible: torch.Tensor | None = None,
    token_num_scale: bool = False,
    split_invariant: bool = True,
) -> torch.Tensor:
    """Every query of a block attends all ``L`` keys of its window plus the visible global keys.

    Shapes: ``q`` (..., B, d); ``k``, ``v`` (..., L, d); ``k_global``, ``v_global`` (..., G, d);
    ``global_visible`` (bool, broadcastable to (..., G); None: all visible). Leading dims may hold
    several blocks. ``local_bias``/``global_bias`` are added to the logits of window/global keys;
    ``token_num_scale`` multiplies the softmax scale by log(keys attended)/log(16).

    ``split_invariant``: plain matrix products and softmax whose shapes depend on the block alone (the
    caller passes one block at a time), so a frame's arithmetic never depends on the split of the
    video. Otherwise one fused ``scaled_dot_product_attention`` call.
    """
    num_window, num_global = k.shape[-2], k_global.shape[-2]
    visible = None
    if num_global:
        visible = torch.ones(num_global, dtype=torch.bool, device=q.device) if global_visible is None else global_visible
        if not bool(visible.any()):
            num_global = 0
    if num_global:
        keys, values = torch.cat([k, k_global], dim=-2), torch.cat([v, v_global], dim=-2)
        global_logit = torch.full(visible.shape, float("-inf"), dtype=q.dtype, device=q.device)
        global_logit.masked_fill_(visible, global_bias)
        local_logit = torch.full(visible.shape[:-1] + (num_window,), local_bias, dtype=q.dtype, device=q.device)
        bias = torch.cat([local_logit, global_logit], dim=-1).unsqueeze(-2)  # (..., 1, L + G)
        counts = visible.sum(-1, keepdim=True).unsqueeze(-1).to(torch.float64) + num_window
    else:
        # Only window keys: a bias shared by all of them cancels in the softmax.
        keys, values, bias = k, v, None
        counts = torch.tensor(float(num_window), dtype=torch.float64)
    factor = (torch.log(counts) / math.log(16.0)).to(q.dtype) if token_num_scale else None
    if not split_invariant:
        if factor is not None:
            q = q * factor
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    logits = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if factor is not None:
        logits = logits * factor
    if bias is not None:
        logits = logits + bias
    return torch.matmul(torch.softmax(logits, dim=-1), values)
