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
    """``conv(x)`` for ``x`` (N, C, F, H, W) and a :func:`is_frame_conv` convolution, computed tap by tap.

    Each (output frame, tap) is one matrix product (C_out, C) x (C, N*H*W) on the input frame's own
    contiguous block, so every product has the same shape and layout whatever the number of frames;
    taps are added in a fixed order, and taps reaching into the zero padding are skipped (adding an
    exact zero changes no bit).
    """
    n, c, frames, h, w = x.shape
    pad = conv.padding[0]
    dilation = conv.dilation[0]
    # (frames, C, N*H*W): each frame one contiguous block (one copy; the input is often a permuted view).
    per_frame = x.permute(2, 1, 0, 3, 4).reshape(frames, c, n * h * w).contiguous()
    out_frames = frames + 2 * pad - dilation * (conv.kernel_size[0] - 1)
    weight = conv.weight.to(x.dtype)[:, :, :, 0, 0]
    weights = [weight[:, :, tap].contiguous() for tap in range(conv.kernel_size[0])]
    bias = conv.bias.to(x.dtype)[:, None] if conv.bias is not None else None
    out = x.new_empty(out_frames, weight.shape[0], n * h * w)
    for f in range(out_frames):
        acc = None
        for tap, tap_weight in enumerate(weights):
            source = f + tap * dilation - pad
            if not 0 <= source < frames:
                continue
            if acc is None:
                acc = torch.mm(tap_weight, per_frame[source], out=out[f])
            else:
                acc.addmm_(tap_weight, per_frame[source])
        if acc is None:
            out[f].zero_()
        if bias is not None:
            out[f].add_(bias)
    # (frames, C_out, N, H, W) -> (N, C_out, frames, H, W)
    return out.view(out_frames, -1, n, h, w).permute(2, 1, 0, 3, 4)
