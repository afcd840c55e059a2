"""Each frame computed by operations whose shapes are fixed by that frame alone.

A video UNet folds a clip's frames into its tensors: spatial layers see ``batch * frames`` images,
a temporal transformer sees every spatial position's frames as one sequence. A matrix product or
convolution over such a tensor has a row count (or batch) that includes the clip's frame count,
and BLAS and oneDNN pick their kernels by shape: small-M paths, blockings and thread partitions
differ (measured on an AVX-512 CPU under ``MKL_CBWR=COMPATIBLE``: a ``Linear`` over 22 rows and
over 10 rows rounds a shared row differently). A frame's bits would then depend on how many other
frames its rank holds. The hooks here give every frame its own call on a contiguous tensor of the
frame's own shape, so its arithmetic is the same on any number of ranks whatever the CPU, BLAS
mode or thread count; the one exception is LayerNorm, whose kernel computes each row on its own
(:class:`FramesFirstRowNorm`). They act only when the engine computes split-invariantly.

Copies are what this costs beyond the arithmetic, so: each frame's input is copied just before its
call, outputs go once into the UNet's order, and a temporal transformer's activations stay
frames-first between its layers (each frame's rows one contiguous block, no copy per layer).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.utils import BaseOutput
from torch import nn

from ..config import EngineConfig
from ..context import DenoiseState


def _combine(outputs: list[Any]) -> Any:
    """Per-frame outputs (each with leading dim ``batch``) -> the folded output (batch * frames, ...).

    Stacked along a new frame axis after the batch: one copy, straight into the UNet's batch-major
    order, whose folding is then a view.
    """
    first = outputs[0]
    if torch.is_tensor(first):
        return torch.stack(outputs, dim=1).flatten(0, 1)
    if isinstance(first, BaseOutput):
        return type(first)(**{key: _combine([o[key] for o in outputs]) for key in first.keys()})
    if isinstance(first, tuple):
        return tuple(_combine(list(parts)) for parts in zip(*outputs))
    if first is None:
        return None
    raise TypeError(f"per-frame call: cannot combine outputs of type {type(first).__name__}")


def linear_per_block(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows`` (blocks, n, C_in) -> (blocks, n, C_out): one matrix product per block, what
    ``F.linear(rows[i], weight, bias)`` computes on that block alone (``mm``/``addmm`` of 2-D operands),
    written straight into block i of ``out`` (a fresh contiguous tensor when None).

    Each block's product is one call whose operands are a contiguous (n, C_in) matrix and the
    layer's weight, and whose output is a contiguous (n, C_out) matrix: shapes and strides fixed by
    the block alone, so BLAS picks the same kernel, blocking and thread split for the block whatever
    the number of blocks. (A batched product over all blocks would not do: its kernel and thread
    partition may depend on the batch count.)
    """
    if rows.dim() != 3 or not rows.is_contiguous():
        raise ValueError(f"linear_per_block: rows must be a contiguous (blocks, n, C) tensor, got {tuple(rows.shape)}")
    if out is None:
        out = rows.new_empty(*rows.shape[:2], weight.shape[0])
    weight_t = weight.t()
    for block_rows, block_out in zip(rows, out):
        if bias is None:
            torch.mm(block_rows, weight_t, out=block_out)
        else:
            torch.addmm(bias, block_rows, weight_t, out=block_out)
    return out


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

        def frame_of(value: Any, f: int) -> Any:
            # Frame f's ``batch`` images, copied into a tensor of their own just before the call
            # (while they are used, in cache); a view when ``batch`` is 1.
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch * frames:
                return value.unflatten(0, (batch, frames))[:, f].contiguous()
            return value

        frame_text = state.frame_text
        outputs = []
        try:
            for f in range(frames):
                if frame_text is not None:
                    state.frame_text = frame_of(frame_text, f)
                frame_kwargs = {k: frame_of(v, f) for k, v in kwargs.items()}
                outputs.append(forward(*(frame_of(a, f) for a in args), **frame_kwargs))
        finally:
            state.frame_text = frame_text
        return _combine(outputs)


# ---- where a tensor keeps each frame's rows ---------------------------------------------------------
class FrameRows:
    """How a layer's input holds frames' rows, for the per-frame hooks below: :meth:`blocks` gives one
    contiguous (rows, C) block per frame (per batch item), or None when the input holds no per-frame
    rows (then the layer runs as is); blocks' outputs (n, rows, C_out) return to the input's layout
    with :meth:`merge`. Each layout of the families is one subclass; the hooks are shared."""

    def blocks(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(n, rows, C_out) blocks -> ``x``'s layout with C_out channels (a view of ``out``)."""
        return out.view(*x.shape[:-1], out.shape[-1]) if x.dim() > 1 else out.view(x.shape[0], out.shape[-1])


class FramesAxis(FrameRows):
    """(..., frames, C): each spatial position's frames one sequence (a UNet's temporal transformer).

    The rows are gathered frames-first, (frames, ..., C), so each frame's rows are one contiguous
    block; outputs come back as a (..., frames, C_out) view of a frames-first tensor, so the next layer
    of the transformer finds its input frames-first already (no copy): activations stay frames-first
    between layers."""

    def blocks(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() < 2:
            return None
        per_frame = x.movedim(-2, 0).contiguous()  # no copy when x is a frames-first view already
        return per_frame.reshape(per_frame.shape[0], -1, per_frame.shape[-1])  # a view: (frames, rows, C)

    def merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        frames_first = x.movedim(-2, 0).shape[:-1]
        return out.view(*frames_first, out.shape[-1]).movedim(0, -2)


class FrameMajorTokens(FrameRows):
    """(batch, frames * tokens, C), frame-major (a DiT's token sequence): each (batch item, frame)'s
    tokens one block; a frame's token count is the call's (``state.tokens_per_frame``), so any run of
    whole frames works (the clip, or a chunk of its frames)."""

    def __init__(self, state: DenoiseState) -> None:
        self.state = state

    def blocks(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() != 3:
            return None
        tokens = self.state.tokens_per_frame
        if x.shape[1] % tokens:
            raise ValueError(f"{x.shape[1]} tokens are not whole latent frames of {tokens} tokens")
        return x.contiguous().view(-1, tokens, x.shape[-1])


class PerFrameText(FrameRows):
    """Per-frame text (batch, frames, seq, C): each (batch item, frame)'s text one block; 3-D text
    (shared by every frame, the same shape on every rank) holds no per-frame rows."""

    def blocks(self, x: torch.Tensor) -> torch.Tensor | None:
        return x.contiguous().flatten(0, 1) if x.dim() == 4 else None


class TokenTimesteps(FrameRows):
    """Per-token timesteps (one per token: Wan2.2 TI2V), flattened (batch * frames * tokens,) or
    their embeddings (batch, frames * tokens, C); only when the call has them (one timestep per
    sample: rows = batch, the same on every rank)."""

    def __init__(self, state: DenoiseState) -> None:
        self.state = state

    def blocks(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.state.token_timesteps:
            return None
        if x.dim() == 1:
            return x.contiguous().view(self.state.batch * len(self.state.layout.owned), -1)
        return frame_blocks(x, len(self.state.layout.owned)) if x.dim() == 3 else None


def frame_blocks(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, frames * tokens, C), frame-major -> (batch * frames, tokens, C): each (batch item, frame)'s
    tokens one contiguous block (a view when ``x`` is contiguous, as a DiT's token path's tensors are)."""
    batch, num_tokens, channels = x.shape
    if num_tokens % frames:
        raise ValueError(f"{num_tokens} tokens do not split into the rank's {frames} latent frames")
    return x.contiguous().view(batch * frames, num_tokens // frames, channels)


# ---- the per-frame hooks ---------------------------------------------------------------------------------
class PerFrameLinear(ModelHook):
    """On a ``Linear`` whose rows are frames' (``rows`` says where): one matrix product per frame block
    (:func:`linear_per_block`) when computing split-invariantly; otherwise the layer's own forward.

    BLAS kernels choose their blocking by the number of rows, so a row could round differently in a
    rank holding 3 frames and in one holding 5; one product per frame, on the frame's contiguous
    rows, has shapes and strides fixed by the frame alone. Keys and values of halo and global frames
    go through the same per-frame call, so a frame's key has the same bits whether its rank
    projected it as an owned, halo or global frame. A ``Linear`` subclass computing something else
    is called once per block.
    """

    def __init__(self, config: EngineConfig, rows: FrameRows) -> None:
        super().__init__()
        self.config, self.rows = config, rows

    def new_forward(self, module: nn.Module, input: torch.Tensor) -> torch.Tensor:
        # ``input``: nn.Linear's own name for it, which diffusers passes by keyword (``proj_in(input=...)``).
        forward: Callable[..., Any] = self.fn_ref.original_forward
        x = input
        blocks = self.rows.blocks(x) if self.config.split_invariant_on(x.device.type) else None
        if blocks is None:
            return forward(x)
        if type(module).forward is not nn.Linear.forward:
            return self.rows.merge(torch.stack([forward(block) for block in blocks]), x)
        return self.rows.merge(linear_per_block(blocks, module.weight, module.bias), x)


class PerFrameModule(ModelHook):
    """On a module that works row by row (a DiT block's feed-forward; a text projection given per-frame
    text; a timestep embedding given one timestep per token): one call per frame block, on its
    contiguous rows, when computing split-invariantly; each call's output written into the block's
    place of the output.

    Besides its matrix products, such a module applies element-wise non-linearities (tanh-GELU,
    SiLU) whose vectorised body and scalar tail round differently (measured: 5-8% of tanh-GELU and
    1-4% of SiLU outputs differ by an ulp between the two); which elements fall in a tail depends
    on the tensor's size and on how its elements are split between threads, i.e. on the frame
    count. A call per frame fixes both by the frame alone. Otherwise the module's own forward.
    """

    def __init__(self, config: EngineConfig, rows: FrameRows) -> None:
        super().__init__()
        self.config, self.rows = config, rows

    def new_forward(self, module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        forward: Callable[..., Any] = self.fn_ref.original_forward
        blocks = self.rows.blocks(x) if self.config.split_invariant_on(x.device.type) else None
        if blocks is None:
            return forward(x, *args, **kwargs)
        out = None
        for index, block in enumerate(blocks):
            result = forward(block, *args, **kwargs)
            if out is None:
                out = result.new_empty(blocks.shape[0], *result.shape)
            out[index] = result
        return self.rows.merge(out, x)


class FramesFirstRowNorm(ModelHook):
    """On a ``LayerNorm`` inside a temporal transformer: one call over all rows, frames-first.

    LayerNorm normalises each row over its own channels; torch's CPU kernel reduces every row
    separately, in an order fixed by the row's length, and splits the work between threads by whole
    rows, so a row's result does not depend on how many rows share the call (unlike a matrix product,
    whose blocking depends on the row count). No per-frame call is needed; computing on the
    frames-first tensor keeps the transformer's activations frames-first (see :class:`FramesAxis`).
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config

    def new_forward(self, module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        forward: Callable[..., Any] = self.fn_ref.original_forward
        if x.dim() < 2 or not self.config.split_invariant_on(x.device.type):
            return forward(x)
        return forward(x.movedim(-2, 0)).movedim(0, -2)
