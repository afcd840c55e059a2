"""Convolution along the frame axis whose every output frame is computed the same way however the
video is split.

``TemporalConvLayer``'s ``Conv3d`` has kernel (k, 1, 1): output frame f is a sum over the taps of a
channel-mixing matrix applied to input frame f + tap - padding. torch's own conv3d picks its algorithm
by tensor shape and thread count, so the same frame computed in a 13-frame tensor on 2 threads and
in a 7-frame clip plus halo on 1 thread rounds differently. Written as one matrix product per tap,
added in a fixed order, each output frame's arithmetic depends only on its own input frames, which
is what makes a video bit-identical on any number of ranks (CPU, float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_frame_conv(conv: nn.Module) -> bool:
    """True for a plain Conv3d that mixes channels and convolves frames only (kernel (k, 1, 1))."""
    return (
        isinstance(conv, nn.Conv3d)
        and conv.kernel_size[1:] == (1, 1)
        and conv.stride == (1, 1, 1)
        and conv.dilation[1:] == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.padding[1:] == (0, 0)
    )


def frame_conv(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` for ``x`` (N, C, F, H, W) and a :func:`is_frame_conv` convolution, computed tap by tap."""
    n, c, frames, h, w = x.shape
    pad = conv.padding[0]
    dilation = conv.dilation[0]
    # One contiguous copy (the input is often a permuted view), so every tap below is a view.
    padded = (F.pad(x, (0, 0, 0, 0, pad, pad)) if pad else x).contiguous()
    out_frames = padded.shape[2] - dilation * (conv.kernel_size[0] - 1)
    weight = conv.weight.to(x.dtype)
    out = None
    for tap in range(conv.kernel_size[0]):
        # A view: frames, height and width stay one contiguous run per (sample, channel).
        source = padded[:, :, tap * dilation : tap * dilation + out_frames].reshape(n, c, -1)
        term = torch.matmul(weight[:, :, tap, 0, 0], source)
        out = term if out is None else out.add_(term)
    if conv.bias is not None:
        out = out.add_(conv.bias.to(x.dtype)[:, None])
    return out.view(n, -1, out_frames, h, w)
