"""Each frame computed by operations whose shapes are fixed by that frame alone.

A video UNet folds a clip's frames into its tensors: spatial layers see ``batch * frames`` images,
a temporal transformer sees every spatial position's frames as one sequence. A matrix product or
convolution over such a tensor has a row count (or batch) that includes the clip's frame count,
and BLAS and oneDNN pick their kernels by shape: small-M paths, blockings and thread partitions
differ (measured on an AVX-512 CPU under ``MKL_CBWR=COMPATIBLE``: a ``Linear`` over 22 rows and
over 10 rows rounds a shared row differently). A frame's bits would then depend on how many other
frames its rank holds. The hooks here give every frame its own call on a contiguous tensor of the
frame's own shape, so its arithmetic is the same on any number of ranks whatever the CPU, BLAS
mode or thread count. They act only when the engine computes split-invariantly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.utils import BaseOutput
from torch import nn

from .config import EngineConfig
from .context import DenoiseState


def frames_first(t: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(batch * frames, ...) in the UNet's batch-major order -> contiguous (frames, batch, ...)."""
    return t.reshape(batch, frames, *t.shape[1:]).transpose(0, 1).contiguous()


def frames_back(t: torch.Tensor) -> torch.Tensor:
    """(frames, batch, ...) -> contiguous (batch * frames, ...), the inverse of :func:`frames_first`."""
    return t.transpose(0, 1).reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _combine(outputs: list[Any]) -> Any:
    """Per-frame outputs (each with leading dim ``batch``) -> the folded output (batch * frames, ...)."""
    first = outputs[0]
    if torch.is_tensor(first):
        return frames_back(torch.stack(outputs))
    if isinstance(first, BaseOutput):
        return type(first)(**{key: _combine([o[key] for o in outputs]) for key in first.keys()})
    if isinstance(first, tuple):
        return tuple(_combine(list(parts)) for parts in zip(*outputs))
    if first is None:
        return None
    raise TypeError(f"per-frame call: cannot combine outputs of type {type(first).__name__}")


class PerFrameCall(ModelHook):
    """On a spatial module (its inputs fold frames into the batch, ``batch * frames`` images): one
    call per frame, on that frame's ``batch`` images.

    Every tensor argument whose leading dimension is ``batch * frames`` (hidden states, the time
    embedding and the text embeddings the UNet repeats per frame) is cut per frame; other arguments
    pass unchanged. Per-frame text embeddings in ``state`` are cut the same way for the duration of
    each call. Everything inside the module (convolutions, norms, attention, matrix products) then
    has shapes fixed by the frame alone.
    """

    def __init__(self, config: EngineConfig, state: DenoiseState) -> None:
        super().__init__()
        self.config, self.state = config, state

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward: Callable[..., Any] = self.fn_ref.original_forward
        state = self.state
        hidden = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
        if hidden is None or state.layout is None or not self.config.split_invariant_on(hidden.device.type):
            return forward(*args, **kwargs)
        frames, batch = len(state.layout.owned), state.batch
        if frames == 1 or hidden.shape[0] != batch * frames:
            # One frame: the call already has that frame's shape. Other leading sizes hold no frames.
            return forward(*args, **kwargs)

        def cut(value: Any) -> Any:
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch * frames:
                return frames_first(value, batch, frames)
            return None

        cut_args = [cut(a) for a in args]
        cut_kwargs = {k: cut(v) for k, v in kwargs.items()}
        frame_text = state.frame_text
        cut_text = frames_first(frame_text, batch, frames) if frame_text is not None else None
        outputs = []
        try:
            for f in range(frames):
                frame_args = [a if c is None else c[f] for a, c in zip(args, cut_args)]
                frame_kwargs = {k: v if cut_kwargs[k] is None else cut_kwargs[k][f] for k, v in kwargs.items()}
                if cut_text is not None:
                    state.frame_text = cut_text[f]
                outputs.append(forward(*frame_args, **frame_kwargs))
        finally:
            state.frame_text = frame_text
        return _combine(outputs)


class PerFrameRows(ModelHook):
    """On a ``Linear`` or ``LayerNorm`` inside a temporal transformer (input (positions, frames, C):
    each spatial position's frames are one sequence): one call per frame, on that frame's rows.

    Keys and values of halo and global frames go through the same per-frame call, so a frame's key
    has the same bits whether its rank projected it as an owned, halo or global frame.
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config

    def new_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        forward: Callable[..., Any] = self.fn_ref.original_forward
        if x.dim() < 2 or not self.config.split_invariant_on(x.device.type):
            return forward(x)
        per_frame = x.movedim(-2, 0).contiguous()  # (frames, ..., C): each frame's rows one contiguous block
        out = torch.stack([forward(rows) for rows in per_frame])
        return out.movedim(0, -2).contiguous()
