"""Wan's transformer forward with its token-wise work in chunks of latent frames (bounded memory).

diffusers' ``WanTransformer3DModel.forward`` runs every block over the whole clip at once: the
8,960-wide feed-forward (1.3B) and its activation, float32 norm and modulation temporaries, the
query/key/value projections, all for every token. Here each block runs in two passes over chunks
of whole latent frames (``EngineConfig.block_tokens`` tokens at a time):

1. the self-attention's keys and values of every owned frame (norm, modulation, projections, key
   norm, rotary), written into one buffer, the only whole-clip tensor a block adds besides the
   hidden states; the halo exchange starts on it;
2. per chunk: queries, dual-scope attention over the window's keys, gated residual, cross-attention,
   feed-forward, written back into the hidden states in place (a chunk reads only its own rows).

The output head (norm, modulation, projection) runs per chunk too. The timestep embedding is
computed once per distinct timestep of a latent frame, never per token (Wan2.2 TI2V gives every
token its own timestep; all tokens of a latent frame share it).

The arithmetic is diffusers': the same operations in the same order on each token, so the result
equals the whole-clip forward up to float rounding (matrix products over other row counts), and
when computing split-invariantly, where every product is per frame anyway, bit for bit (but for
the per-frame timestep embedding of TI2V). Working memory per latent frame is then the hidden
states plus the keys and values (3x the hidden state) plus the rotary tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

from ...context import DenoiseState

__all__ = ["BLOCK_VALUES", "BlockCall", "ChunkedBlock", "chunk_tokens", "chunked_forward", "frame_chunks"]

BLOCK_VALUES = 3 * 2**24
"""``block_tokens: auto``: a chunk's hidden states hold at most this many values (tokens x width)."""


def chunk_tokens(block_tokens: int | str, width: int) -> int:
    """The tokens of a chunk: ``block_tokens``, or for ``auto`` :data:`BLOCK_VALUES` over the model's
    hidden width (32,768 tokens at Wan2.1-1.3B's 1,536)."""
    return max(1, BLOCK_VALUES // width) if block_tokens == "auto" else int(block_tokens)


def frame_chunks(frames: int, tokens_per_frame: int, block_tokens: int) -> Iterator[range]:
    """Consecutive ranges of local latent frames, each at most ``block_tokens`` tokens (at least one
    frame), as few as that allows and as even as possible: 21 frames of at most 10 are 7 + 7 + 7, not
    10 + 10 + 1 (a one-frame chunk runs every kernel of a block for a sliver of the work)."""
    most = max(1, block_tokens // tokens_per_frame)
    count = -(-frames // most)
    size, longer = divmod(frames, count) if frames else (0, 0)
    start = 0
    for index in range(count):
        stop = start + size + (index < longer)
        yield range(start, stop)
        start = stop


class _Modulation:
    """A block's (or the output head's) shift/scale/gate rows: one set per call (batch, n, C) or per
    latent frame (batch, frames, n, C); :meth:`rows` gives a chunk's, each (batch, 1, C) or
    (batch, frames, 1, C), broadcast against the chunk's (batch, frames, tokens, C) view."""

    def __init__(self, table: torch.Tensor, embedding: torch.Tensor, kind: str) -> None:
        self.table, self.embedding, self.kind = table, embedding, kind

    def rows(self, frames: range, tokens: int) -> list[torch.Tensor]:
        if self.kind == "call":  # (batch, n, C) + (1, n, C): diffusers' (scale_shift_table + temb.float())
            return list((self.table + self.embedding.float()).chunk(self.table.shape[-2], dim=1))
        # per latent frame: (batch, frames, n, C), one row per frame, broadcast over its tokens
        mod = self.table.unsqueeze(0) + self.embedding[:, frames.start : frames.stop].float()
        return list(mod.chunk(self.table.shape[-2], dim=2))

    def apply(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens: int) -> torch.Tensor:
        """``x * (1 + scale) + shift`` on a chunk's (batch, frames*tokens, C) float rows."""
        if self.kind != "frame":
            return x * (1 + scale) + shift
        return (x.unflatten(1, (-1, tokens)) * (1 + scale) + shift).flatten(1, 2)

    def gate(self, x: torch.Tensor, gate: torch.Tensor, tokens: int) -> torch.Tensor:
        """``x * gate`` on a chunk's rows."""
        if self.kind != "frame":
            return x * gate
        return (x.unflatten(1, (-1, tokens)) * gate).flatten(1, 2)


def _time_embedding(model: WanTransformer3DModel, timestep: torch.Tensor, text: torch.Tensor, frames: int,
                    tokens: int, state: DenoiseState) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(temb, the blocks' modulation embedding (.., 6, C), kind): per call for a (batch,) timestep; per
    latent frame for a (batch, tokens) one (Wan2.2 TI2V; a frame's tokens share their timestep),
    computed once per distinct timestep on rows of ``batch`` (the same shapes on every rank), not per
    token: diffusers' per-token embedding is a float32 (tokens, 6, C) tensor, 62 MiB per latent
    frame at TI2V-5B's 704x1280."""
    embedder = model.condition_embedder

    def embed(t: torch.Tensor, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        proj = embedder.timesteps_proj(t)
        if seq_len is not None:
            proj = proj.unflatten(0, (-1, seq_len))
        dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if proj.dtype != dtype and dtype != torch.int8:
            proj = proj.to(dtype)
        temb = embedder.time_embedder(proj).type_as(text)
        return temb, embedder.time_proj(embedder.act_fn(temb))

    if timestep.dim() == 1:
        temb, proj = embed(timestep, None)
        return temb, proj.unflatten(1, (6, -1)), "call"
    per_frame = timestep.view(timestep.shape[0], frames, tokens)
    if timestep.device.type != "meta" and not bool((per_frame == per_frame[..., :1]).all()):
        raise ValueError("timestep: the tokens of a latent frame must share their timestep")
    state.token_timesteps = False  # the per-token hooks see rows of one timestep per batch item
    if timestep.device.type == "meta":
        columns, inverse = per_frame[:, :1, 0], torch.zeros(frames, dtype=torch.long, device=timestep.device)
    else:
        columns, inverse = torch.unique(per_frame[..., 0], dim=1, return_inverse=True)
    parts = [embed(columns[:, c], None) for c in range(columns.shape[1])]
    temb = torch.stack([p[0] for p in parts], dim=1)[:, inverse]  # (batch, frames, C)
    proj = torch.stack([p[1] for p in parts], dim=1)[:, inverse]
    return temb, proj.unflatten(2, (6, -1)), "frame"


@dataclass(frozen=True)
class BlockCall:
    """What :func:`chunked_forward` hands each block in place of diffusers' ``temb`` (the block's
    modulation embedding, and how the clip is chunked); :class:`ChunkedBlock` recognises it."""

    embedding: torch.Tensor
    kind: str
    chunks: list[range]
    owned: range
    tokens: int


class ChunkedBlock(ModelHook):
    """On a ``WanTransformerBlock``: given a :class:`BlockCall`, the block chunk by chunk, in place
    (:func:`_block`); otherwise (diffusers' own forward calling it) the block's forward. The blocks are
    called as modules, so other hooks on them (diffusers' group offloading loads a block's weights in
    its pre-forward) run around the chunked block as around the original."""

    def new_forward(self, module: WanTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    temb: Any, rotary_emb: Any) -> torch.Tensor:
        if not isinstance(temb, BlockCall):
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        modulation = _Modulation(module.scale_shift_table, temb.embedding, temb.kind)
        _block(module, hidden_states, encoder_hidden_states, modulation, rotary_emb, temb.chunks, temb.owned, temb.tokens)
        return hidden_states


def _block(block: WanTransformerBlock, x: torch.Tensor, text: torch.Tensor, modulation: _Modulation,
           rotary: tuple[torch.Tensor, torch.Tensor], chunks: list[range], owned: range, tokens: int) -> None:
    """One ``WanTransformerBlock`` on ``x`` (batch, frames*tokens, C), in place, chunk by chunk."""
    processor = block.attn1.processor
    call = processor.temporal_call(x.device.type)

    def rows(frames: range) -> slice:
        return slice(frames.start * tokens, frames.stop * tokens)

    def normed(frames: range, mods: list[torch.Tensor]) -> torch.Tensor:
        h = x[:, rows(frames)]
        return modulation.apply(block.norm1(h.float()), mods[0], mods[1], tokens).type_as(h)

    def rotary_of(frames: range) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(table[:, rows(frames)] for table in rotary)

    # 1. keys and values of every owned frame, written into the window's buffer (owned frames and their
    #    halo), into which the neighbours' frames are then received: one buffer per layer
    span = processor.window(call)
    at = owned.start - span.start
    window_kv = None
    for frames in chunks:
        sent, _, _ = processor.exchanged(block.attn1, normed(frames, modulation.rows(frames, tokens)), call,
                                         rotary_emb=rotary_of(frames))
        if window_kv is None:
            window_kv = sent.new_empty(sent.shape[0], len(span), *sent.shape[2:])
        window_kv[:, at + frames.start : at + frames.stop] = sent
        del sent
    own = window_kv.narrow(1, at, len(owned))
    context, context_frames, global_states = processor.start(own, 1, call, out=window_kv).wait()
    del own, window_kv

    # 2. per chunk: attention, cross-attention and feed-forward, written back in place
    for frames in chunks:
        shift, scale, gate, c_shift, c_scale, c_gate = modulation.rows(frames, tokens)
        h = x[:, rows(frames)]
        hidden = normed(frames, [shift, scale])
        rotary_emb = rotary_of(frames)
        query = processor.before_wait(block.attn1, hidden, call, None, rotary_emb=rotary_emb)
        attn_output = processor.attend(block.attn1, hidden, query, context, context_frames, global_states, call,
                                       rotary_emb=rotary_emb,
                                       query_frames=range(owned.start + frames.start, owned.start + frames.stop))
        del hidden, query
        h = (h.float() + modulation.gate(attn_output, gate, tokens)).type_as(h)
        frame_text = text[:, frames.start : frames.stop] if text.dim() == 4 else text
        h = h + block.attn2(block.norm2(h.float()).type_as(h), frame_text, None, None)
        hidden = modulation.apply(block.norm3(h.float()), c_shift, c_scale, tokens).type_as(h)
        ff_output = block.ffn(hidden)
        x[:, rows(frames)] = (h.float() + modulation.gate(ff_output.float(), c_gate, tokens)).type_as(h)


def chunked_forward(model: WanTransformer3DModel, state: DenoiseState, block_tokens: int,
                    hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True) -> Any:
    """``WanTransformer3DModel.forward`` (no LoRA scale) with the blocks' and the output head's
    token-wise work in chunks of at most ``block_tokens`` tokens (whole latent frames)."""
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    pph, ppw = height // p_h, width // p_w
    tokens = pph * ppw
    owned = state.layout.owned
    chunks = list(frame_chunks(frames, tokens, block_tokens))

    rotary = model.rope(hidden_states)
    x = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    text = encoder_hidden_states
    temb, block_embedding, kind = _time_embedding(model, timestep, text, frames, tokens, state)
    text = model.condition_embedder.text_embedder(text)
    if encoder_hidden_states_image is not None:
        image = model.condition_embedder.image_embedder(encoder_hidden_states_image)
        text = torch.cat([image[:, None].expand(-1, text.shape[1], -1, -1) if text.dim() == 4 else image, text],
                         dim=-2)

    call = BlockCall(block_embedding, kind, chunks, owned, tokens)
    for block in model.blocks:
        x = block(x, text, call, rotary)  # through the block's hooks (ChunkedBlock): in place

    # the output head, per chunk: (batch, frames*tokens, p_t*p_h*p_w*out_channels)
    head = _Modulation(model.scale_shift_table, temb.unsqueeze(-2), kind)
    out = None
    for chunk in chunks:
        h = x[:, chunk.start * tokens : chunk.stop * tokens]
        shift, scale = head.rows(chunk, tokens)
        result = model.proj_out(head.apply(model.norm_out(h.float()), shift, scale, tokens).type_as(h))
        if out is None:
            out = result.new_empty(batch, frames * tokens, result.shape[-1])
        out[:, chunk.start * tokens : chunk.stop * tokens] = result
    del x
    out = out.reshape(batch, frames // p_t, pph, ppw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)
