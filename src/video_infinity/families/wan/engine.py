"""The clip-parallel engine on diffusers' Wan DiT (``WanTransformer3DModel``: Wan2.1, Wan2.2).

Wan's temporal patch size is 1, so each latent frame is one block of H'xW' tokens (frame-major) and
every module but self-attention works token by token. Under clip parallelism each rank owns a
contiguous range of latent frames; only self-attention needs other ranks:

* ``WanRotaryPosEmbed`` gets a hook that returns the rotary angles of the rank's *global* latent
  frames, so positions are those of one process running the whole video;
* when computing split-invariantly, every op of the token path has shapes fixed by the latent frame,
  not by the rank's clip: the patch embedding and the token-path linear layers compute one matrix
  product per (batch item, latent frame); each feed-forward, the text projection of per-frame text
  and the embedding of per-token timesteps are called once per (batch item, latent frame) (their
  element-wise non-linearities round differently in vector body and scalar tail); norms are
  row-local and the modulations element-wise, so they run on the whole clip;
* every self-attention (``WanAttention`` that is not cross-attention) gets
  :class:`WanDualScopeAttnProcessor`: keys and values are computed after the key norm and the
  rotary embedding, the neighbours' frames arrive point-to-point (and the global frames from their
  owners) while the queries are computed, then dual-scope attention over latent frames; in a loop
  (``EngineConfig.loop``) the latent frames lie on a ring and a key's temporal rotary angle is that of
  its unwrapped position, so query-key distances are ring distances; ``attn.rotary_clip`` clamps
  each query-key temporal distance;
* cross-attentions get :class:`WanFrameCrossAttnProcessor`: one text embedding per latent frame
  (multi-prompt) and, when computing split-invariantly, arithmetic fixed per latent frame.

Nothing else is touched: the model's own forward runs unchanged on the rank's frames.
"""

from __future__ import annotations

import logging

import torch
from diffusers.hooks import ModelHook
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from torch import nn

from ...engine.attention import TemporalAttnProcessor, TemporalCall, dual_scope_attention
from ...config import EngineConfig
from ...context import ClipContext, DenoiseState
from ...frames import clipped_offsets, window
from ...engine.per_frame import (
    FrameMajorTokens,
    PerFrameLinear,
    PerFrameModule,
    PerFrameText,
    TokenTimesteps,
    linear_per_block,
)
from ...engine.comm import max_over_ranks
from ...engine.flex import band_attention, flex_available
from ...engine.common import TrackCall, scalar_timestep
from ...engine.handle import ParallelHandle
from .blocks import ChunkedBlock, chunk_tokens, chunked_forward

logger = logging.getLogger(__name__)

__all__ = ["WanDualScopeAttnProcessor", "WanFrameCrossAttnProcessor", "accepts", "parallelize"]


def accepts(model: nn.Module) -> bool:
    return isinstance(model, WanTransformer3DModel)


class _TrackWanCall(TrackCall):
    """On the transformer: the call's latent-frame layout and timestep (per token: Wan2.2 TI2V); then
    its forward with the token-wise work in frame chunks (:mod:`.blocks`, ``EngineConfig.block_tokens``),
    or diffusers' own when that is None or a LoRA scale is given (``attention_kwargs``)."""

    sample_name = "hidden_states"

    def __init__(self, ctx: ClipContext, state: DenoiseState, config: EngineConfig) -> None:
        super().__init__(ctx, state)
        self.config = config

    def new_forward(self, module: WanTransformer3DModel, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor | None = None,
                    return_dict: bool = True, attention_kwargs: dict | None = None):
        if self.config.block_tokens is None or attention_kwargs:
            return self.fn_ref.original_forward(hidden_states, timestep, encoder_hidden_states,
                                                encoder_hidden_states_image, return_dict, attention_kwargs)
        block_tokens = chunk_tokens(self.config.block_tokens,
                                    module.config.num_attention_heads * module.config.attention_head_dim)
        return chunked_forward(module, self.state, block_tokens, hidden_states, timestep,
                               encoder_hidden_states, encoder_hidden_states_image, return_dict)

    def call_timestep(self, timestep: torch.Tensor | float | int) -> float:
        """One timestep per token (Wan2.2 TI2V; image-to-video gives the image's tokens 0): the call's
        is the largest of the whole video's, the step's, so that every rank, also one that holds only
        given frames, attends with the same phase biases and global frames."""
        if not torch.is_tensor(timestep) or timestep.dim() < 2 or timestep.device.type == "meta":
            return scalar_timestep(timestep)
        per_sample = timestep.detach().flatten(1).amax(dim=1).float().cpu()
        if not torch.all(per_sample == per_sample[0]):
            raise ValueError("timestep: the engine needs one timestep per model call (phase biases); got "
                             "different per-sample values")
        return max_over_ranks(self.ctx, float(per_sample[0]), timestep.device)

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        sample, timestep = self.record(args, kwargs)
        _, p_h, p_w = module.config.patch_size
        self.state.tokens_per_frame = (sample.shape[3] // p_h) * (sample.shape[4] // p_w)
        self.state.token_timesteps = timestep.dim() == 2
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if text is not None and text.dim() == 4 and text.shape[1] != sample.shape[2]:
            raise ValueError(
                f"encoder_hidden_states: per-frame text embeddings cover {text.shape[1]} latent frames, "
                f"the rank's input has {sample.shape[2]}"
            )
        return args, kwargs


class _GlobalRotaryPositions(ModelHook):
    """On ``WanRotaryPosEmbed``: the rotary angles of the rank's global latent frames.

    The same tables and layout as diffusers' own forward, with the frame axis starting at the
    rank's first global latent frame instead of 0.
    """

    def __init__(self, state: DenoiseState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: WanRotaryPosEmbed, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.state.layout
        if layout.total_frames > module.max_seq_len:
            raise ValueError(
                f"the video has {layout.total_frames} latent frames but the transformer's rotary table holds "
                f"{module.max_seq_len} (rope_max_seq_len): generate at most {module.max_seq_len} latent frames"
            )
        _, _, num_frames, height, width = hidden_states.shape
        _, p_h, p_w = module.patch_size
        owned, pph, ppw = layout.owned, height // p_h, width // p_w
        sizes = [module.t_dim, module.h_dim, module.w_dim]

        def table(freqs: torch.Tensor) -> torch.Tensor:
            t, h, w = freqs.split(sizes, dim=1)
            grid = (num_frames, pph, ppw, -1)
            parts = [
                t[owned.start : owned.stop].view(num_frames, 1, 1, -1).expand(grid),
                h[:pph].view(1, pph, 1, -1).expand(grid),
                w[:ppw].view(1, 1, ppw, -1).expand(grid),
            ]
            return torch.cat(parts, dim=-1).reshape(1, num_frames * pph * ppw, 1, -1)

        return table(module.freqs_cos), table(module.freqs_sin)


class _PatchEmbeddingAsMatmul(ModelHook):
    """On the patch embedding (a ``Conv3d`` whose kernel equals its stride): one matrix product over
    each (batch item, latent frame)'s patches when computing split-invariantly.

    oneDNN picks its convolution algorithm by input size, so a latent frame rounds differently in a
    one-frame clip and in a longer one; one product per frame on the frame's contiguous (patches x
    patch values) rows (:func:`~video_infinity.engine.per_frame.linear_per_block`) gives every frame the
    same arithmetic. The output is laid out (batch, frames, h, w, C) and returned as the
    convolution's (batch, C, frames, h, w) view, so the transformer's flattening to tokens is a view
    too. Otherwise the module's own convolution.
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config

    def new_forward(self, module: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        if not self.config.split_invariant_on(x.device.type):
            return nn.functional.conv3d(x, module.weight, module.bias, module.stride)
        batch, channels, frames, height, width = x.shape
        p_t, p_h, p_w = module.kernel_size
        grid = (frames // p_t, height // p_h, width // p_w)
        patches = x.reshape(batch, channels, grid[0], p_t, grid[1], p_h, grid[2], p_w)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch * grid[0], grid[1] * grid[2], -1)
        out = linear_per_block(patches, module.weight.flatten(1), module.bias)  # (batch*frames, patches, C)
        return out.view(batch, *grid, -1).permute(0, 4, 1, 2, 3)


def _is_patch_embedding(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv3d)
        and module.kernel_size == module.stride
        and module.padding == (0, 0, 0)
        and module.dilation == (1, 1, 1)
        and module.groups == 1
    )


def _token_path_linears(transformer: WanTransformer3DModel) -> list[nn.Linear]:
    """The linear layers whose rows are the video's tokens (not the text's or the timestep's), but
    for the feed-forwards' (each feed-forward is called per frame as a whole, :class:`~video_infinity.engine.per_frame.PerFrameModule`)."""
    linears = [transformer.proj_out] if isinstance(transformer.proj_out, nn.Linear) else []
    for block in transformer.modules():
        if not isinstance(block, WanTransformerBlock):
            continue
        for attn in (block.attn1, block.attn2):
            if attn.is_cross_attention:  # only the queries and the output are token rows
                linears += [m for m in (attn.to_q, attn.to_out[0]) if isinstance(m, nn.Linear)]
            else:
                linears += [m for m in attn.modules() if isinstance(m, nn.Linear)]
    return linears


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (batch, tokens, heads, head_dim), as diffusers' ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _temporal_rotation(rope: WanRotaryPosEmbed, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (len(offsets), t_dim) rotating the temporal rotary channels by ``offsets``
    latent frames (negative too), in the layout of the rotary tables.

    An offset beyond the table (``rope_max_seq_len`` rows) is composed from two rows by the angle
    sum formulas (in the tables' float64); a row inside the table is taken as is (times 1, plus 0).
    """
    rows = rope.max_seq_len - 1
    if any(abs(d) > 2 * rows for d in offsets):
        raise ValueError(
            f"rope_max_seq_len: rotary offsets up to {max(abs(d) for d in offsets)} latent frames are needed "
            f"(loop), the table reaches {2 * rows}; use fewer latent frames or a larger rope_max_seq_len"
        )
    cos_t, sin_t = rope.freqs_cos[:, : rope.t_dim], rope.freqs_sin[:, : rope.t_dim]
    first = torch.tensor([min(abs(d), rows) for d in offsets], dtype=torch.long, device=cos_t.device)
    second = torch.tensor([abs(d) - min(abs(d), rows) for d in offsets], dtype=torch.long, device=cos_t.device)
    sign = torch.tensor([-1.0 if d < 0 else 1.0 for d in offsets], dtype=sin_t.dtype, device=sin_t.device)[:, None]
    ca, sa, cb, sb = cos_t[first], sin_t[first], cos_t[second], sin_t[second]
    return ca * cb - sa * sb, sign * (sa * cb + ca * sb)


def _rotate_temporal(x: torch.Tensor, rope: WanRotaryPosEmbed, frames: int, offsets: list[int]) -> torch.Tensor:
    """``x`` (batch, frames*tokens, heads, head_dim), frame-major: rotate frame i's temporal rotary
    channels by ``offsets[i]`` latent frames (RoPE: adding an angle is one more rotation)."""
    if not frames:
        return x
    cos, sin = _temporal_rotation(rope, offsets)
    tokens = x.shape[1] // frames
    cos, sin = (t.repeat_interleave(tokens, dim=0)[None, :, None, :] for t in (cos, sin))
    temporal = _apply_rotary(x[..., : rope.t_dim], cos, sin)
    return torch.cat([temporal, x[..., rope.t_dim :]], dim=-1)


class WanDualScopeAttnProcessor(TemporalAttnProcessor):
    """Self-attention of ``WanAttention`` over latent frames: dual-scope windows, keys from neighbours.

    A query token of latent frame g attends every token of the latent frames within ``padding`` of g
    (clipped at the video's ends; in a loop taken around the ring, see ``frames.attention_reach``)
    and every token of the ``top_k`` global latent frames, with the phase biases and
    ``token_num_scale`` of the engine config. With a window covering the whole video this is
    diffusers' ``WanAttnProcessor``. Neighbours receive keys and values as they enter attention
    (normed, rotated), so no rank projects another's frames.

    In a loop a key frame that arrives across the wrap (unwrapped position u < 0 or u >= frames)
    carries the rotary angle of u, not of its frame u mod frames, so every query-key distance is a
    ring distance; global frames keep their fixed index. When computing split-invariantly the
    temporal rotation is applied relative to each query frame (query at angle 0, key at u - g: the
    same product by RoPE's rotation identity), so no frame has angles of its own and rolling the
    video rolls the result bit for bit; otherwise queries and keys keep their absolute angles and
    the keys across the wrap get one more rotation by +-frames.

    ``attn.rotary_clip`` R: a key at (unwrapped) position u is rotated relative to each query frame g
    by clamp(u - g, -R, R) (global keys by clamp(k - g, -R, R)), the query not at all, one query
    frame at a time as above; the spatial channels keep their absolute angles. An R reaching the
    video's longest distance changes no angle and is not applied (the same bits as without it).
    """

    kind = "Wan dual-scope attention"

    def __init__(self, config: EngineConfig, ctx: ClipContext, state: DenoiseState, rope: WanRotaryPosEmbed) -> None:
        super().__init__(config, ctx, state)
        self.rope = rope

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 **kwargs) -> torch.Tensor:
        # WanAttention passes the rotary tables positionally.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb=rotary_emb, **kwargs)

    def check(self, attn: WanAttention, hidden_states: torch.Tensor) -> None:
        pass  # (batch, tokens, channels); the token count is checked against the frames in ``_tokens``

    def _clip(self, call: TemporalCall) -> int | None:
        """``attn.rotary_clip`` where it changes a distance: None when it reaches the longest
        query-key distance of the video (its latent frames - 1: a global frame at the far end;
        local keys in a loop are nearer), so such a clip computes as no clip at all."""
        clip = self.config.rotary_clip
        return clip if clip is not None and clip < call.layout.total_frames - 1 else None

    def _relative(self, call: TemporalCall, rotary_emb) -> bool:
        """Relative temporal angles (split-invariant ring, or clipped distances): only the spatial
        channels rotate up front."""
        return rotary_emb is not None and ((call.loop and call.split_invariant) or self._clip(call) is not None)

    def _rotate(self, x: torch.Tensor, call: TemporalCall, rotary_emb) -> torch.Tensor:
        if rotary_emb is None:
            return x
        if self._relative(call, rotary_emb):
            t_dim = self.rope.t_dim
            cos, sin = (t[..., t_dim:] for t in rotary_emb)
            return torch.cat([x[..., :t_dim], _apply_rotary(x[..., t_dim:], cos, sin)], dim=-1)
        return _apply_rotary(x, *rotary_emb)

    def _tokens(self, hidden_states: torch.Tensor, call: TemporalCall) -> tuple[int, int]:
        """(latent frames in ``hidden_states``: the clip's, or a chunk's; tokens per latent frame)."""
        tokens = self.state.tokens_per_frame
        if hidden_states.shape[1] % tokens:
            raise ValueError(f"{hidden_states.shape[1]} tokens are not whole latent frames of {tokens} tokens")
        return hidden_states.shape[1] // tokens, tokens

    def exchanged(self, attn: WanAttention, hidden_states: torch.Tensor, call: TemporalCall, rotary_emb=None,
                  **kwargs) -> tuple[torch.Tensor, int, object]:
        # Neighbours need our keys/values as they enter attention (normed, rotated): sent as one
        # (batch, frames, tokens, heads, 2*head_dim) tensor; the queries are computed meanwhile.
        frames, tokens = self._tokens(hidden_states, call)
        query = None
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        key = self._rotate(attn.norm_k(key).unflatten(2, (attn.heads, -1)), call, rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))
        return torch.cat([key, value], dim=-1).unflatten(1, (frames, tokens)), 1, query

    def before_wait(self, attn: WanAttention, hidden_states: torch.Tensor, call: TemporalCall, carry: object,
                    rotary_emb=None, **kwargs) -> torch.Tensor:
        query = attn.to_q(hidden_states) if carry is None else carry
        return self._rotate(attn.norm_q(query).unflatten(2, (attn.heads, -1)), call, rotary_emb)

    def attend(self, attn: WanAttention, hidden_states: torch.Tensor, early: object, context: torch.Tensor,
               context_frames: range, global_states: torch.Tensor, call: TemporalCall, rotary_emb=None,
               query_frames: range | None = None, **kwargs) -> torch.Tensor:
        """``query_frames``: the (global) latent frames of ``hidden_states``, a chunk of the clip's (default:
        the clip); ``context`` holds the keys of every frame their windows reach."""
        config, layout, query = self.config, call.layout, early
        query_frames = layout.owned if query_frames is None else query_frames
        total, loop, left, right = layout.total_frames, call.loop, call.left, call.right
        _, tokens = self._tokens(hidden_states, call)
        head_dim = context.shape[-1] // 2
        # Several query frames under a band window need a (frames*tokens)^2 mask; one query frame at
        # a time sees its whole key span and needs none (and a whole window needs none either; a
        # ring's unwrapped spans differ per query frame, so never there).
        whole_window = not loop and max(left, right) >= total - 1
        attend = dict(total_frames=total, padding=config.padding, scale=head_dim**-0.5 * config.attn_scale,
                      local_bias=call.local_bias, global_bias=call.global_bias, token_num_scale=config.token_num_scale,
                      chunk_size=config.query_chunk(call.split_invariant) if whole_window else 1,
                      split_invariant=call.split_invariant, loop=loop, tokens_per_frame=tokens)

        def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(batch, frames, tokens, heads, 2d) -> keys (batch, frames*tokens, heads, d) and values."""
            return t.flatten(1, 2).split(head_dim, dim=-1)

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2)

        key, value = split(context)
        global_key, global_value = split(global_states)
        global_frames = call.global_frames
        if self._relative(call, rotary_emb):
            # One query frame at a time (as the split-invariant ring computes anyway): its window's
            # keys and the global keys rotated by their distance from it (clamped to
            # ``attn.rotary_clip``), the query not at all. Memory: one query frame's keys at a time.
            clip = self._clip(call)
            outputs = []
            for index, frame in enumerate(query_frames):
                span = window(range(frame, frame + 1), left, right, total, loop)
                at = (span.start - context_frames.start) * tokens
                span_key = key[:, at : at + len(span) * tokens]
                span_key = _rotate_temporal(span_key, self.rope, len(span), clipped_offsets(frame, span, clip))
                frame_global_key = _rotate_temporal(global_key, self.rope, len(global_frames),
                                                    clipped_offsets(frame, global_frames, clip))
                outputs.append(dual_scope_attention(
                    heads_first(query[:, index * tokens : (index + 1) * tokens]),
                    heads_first(span_key),
                    heads_first(value[:, at : at + len(span) * tokens]),
                    heads_first(frame_global_key),
                    heads_first(global_value),
                    query_frames=range(frame, frame + 1),
                    key_frames=span,
                    # one frame per block: a whole window's block of frames would attend them all
                    **{**attend, "chunk_size": 1},
                ))
            out = torch.cat(outputs, dim=-2)
        else:
            if loop and rotary_emb is not None:
                # Keys across the wrap were rotated for their frame u mod total: shift them to u.
                laps = [u - u % total for u in context_frames]
                if any(laps):
                    key = _rotate_temporal(key, self.rope, len(context_frames), laps)
            tensors = (heads_first(t) for t in (query, key, value, global_key, global_value))
            if not whole_window and self.engine_config.flex_on(query.device.type):
                # All the chunk's query frames in one kernel (one frame per call is too small a call).
                out = band_attention(*tensors, query_frames=query_frames, key_frames=context_frames, total_frames=total,
                                     left=left, right=right, scale=attend["scale"], local_bias=call.local_bias,
                                     global_bias=call.global_bias, token_num_scale=config.token_num_scale, loop=loop,
                                     tokens_per_frame=tokens)
            else:
                out = dual_scope_attention(*tensors, query_frames=query_frames, key_frames=context_frames, **attend)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return self.output(attn, out, hidden_states)


class WanFrameCrossAttnProcessor:
    """Cross-attention of ``WanAttention`` to the text, latent frame by latent frame.

    Text of shape (batch, frames, seq, dim) gives each latent frame's tokens their own frame's text
    (multi-prompt); 3-D text is shared by all frames. Image-to-video's CLIP tokens (before the text,
    ``add_k_proj``) get their own attention, added to the text's, as diffusers does. When computing
    split-invariantly, the attention runs as one fused attention call per latent frame, on that
    frame's queries and its text (and image), so a
    token's arithmetic does not depend on how many frames its rank holds (torch's fused CPU
    attention kernel splits its work by sequence length and thread count); per-frame text is
    projected to keys and values one frame at a time too. Otherwise the wrapped processor
    (diffusers'), with the frames moved into the batch for per-frame text.
    """

    def __init__(self, inner: object, config: EngineConfig, state: DenoiseState) -> None:
        self.inner, self.engine_config, self.state = inner, config, state

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None, **kwargs) -> torch.Tensor:
        per_frame = encoder_hidden_states is not None and encoder_hidden_states.dim() == 4
        plain = (
            encoder_hidden_states is None
            or attention_mask is not None
            or not self.engine_config.split_invariant_on(hidden_states.device.type)
        )
        if plain and not per_frame:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        frames = encoder_hidden_states.shape[1] if per_frame else hidden_states.shape[1] // self.state.tokens_per_frame
        if plain:
            batch = hidden_states.shape[0]
            out = self.inner(attn, hidden_states.unflatten(1, (frames, -1)).flatten(0, 1),
                             encoder_hidden_states.flatten(0, 1), attention_mask, rotary_emb, **kwargs)
            return out.unflatten(0, (batch, frames)).flatten(1, 2)

        def text_projection(linear: nn.Module, text: torch.Tensor) -> torch.Tensor:
            # Per-frame text: one product per (batch item, frame) on its own rows, like the token path.
            rows = PerFrameText()
            blocks = rows.blocks(text) if isinstance(linear, nn.Linear) else None
            if blocks is None:
                return linear(text)
            return rows.merge(linear_per_block(blocks, linear.weight, linear.bias), text)

        heads = attn.heads

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            """(batch, seq, heads*d) -> a fresh (batch, heads, seq, d) tensor."""
            return t.unflatten(-1, (heads, -1)).transpose(1, 2).contiguous()

        image_kv = None
        if attn.add_k_proj is not None:
            # Image-to-video (Wan2.1 I2V): the image's CLIP tokens come first, then the text's 512
            # (diffusers' rule); they are the same for every frame and every rank, so projected once.
            image_length = encoder_hidden_states.shape[-2] - 512
            image = encoder_hidden_states[..., :image_length, :]
            encoder_hidden_states = encoder_hidden_states[..., image_length:, :]
            image = image[:, 0] if per_frame else image
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(image).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image), attn.add_v_proj(image)
            image_kv = (heads_first(attn.norm_added_k(key_img)), heads_first(value_img))

        query = attn.to_q(hidden_states)
        if getattr(attn, "fused_projections", False):
            key, value = text_projection(attn.to_kv, encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = (text_projection(linear, encoder_hidden_states) for linear in (attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        # (batch, frames, tokens per frame, heads, d): each frame's queries a view; keys and values
        # (batch, text frames, seq, heads, d) with one text frame shared by all when the text is 3-D.
        query = query.unflatten(2, (heads, -1)).unflatten(1, (frames, -1))
        key, value = (t.unflatten(-1, (heads, -1)) for t in (key, value))
        if not per_frame:
            key, value = key[:, None], value[:, None]
        out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
        shared = None
        for f in range(frames):
            # One fused attention call per latent frame on fresh heads-first copies: shapes and layout
            # fixed by the frame (the CPU kernel splits its work by sequence lengths and threads).
            if per_frame or shared is None:
                text_frame = f if per_frame else 0
                shared = tuple(t[:, text_frame].transpose(1, 2).contiguous() for t in (key, value))
            frame_query = query[:, f].transpose(1, 2).contiguous()
            frame_out = nn.functional.scaled_dot_product_attention(frame_query, *shared).transpose(1, 2)
            if image_kv is not None:  # diffusers adds the image's attention output to the text's
                frame_image = nn.functional.scaled_dot_product_attention(frame_query, *image_kv).transpose(1, 2)
                frame_out = (frame_out.flatten(2, 3).type_as(query) + frame_image.flatten(2, 3).type_as(query)
                             ).unflatten(-1, (heads, -1))
            out[:, f] = frame_out
        out = out.flatten(3, 4).flatten(1, 2).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def parallelize(transformer: WanTransformer3DModel, config: EngineConfig, context: ClipContext) -> ParallelHandle:
    """Hooks and processors for a Wan transformer (see :func:`video_infinity.parallelize`).

    ``context.total_frames`` counts latent frames. Wan2.2 A14B's two experts are two transformers:
    parallelize each (with the same context); each gets its own handle.
    """
    patch_frames = transformer.config.patch_size[0]
    if patch_frames != 1:
        raise ValueError(
            f"patch_size: the Wan engine needs a temporal patch size of 1 (token frame = latent frame), "
            f"got {patch_frames}"
        )
    ropes = [m for m in transformer.modules() if isinstance(m, WanRotaryPosEmbed)]
    attentions = [m for m in transformer.modules() if isinstance(m, WanAttention)]
    self_attentions = [m for m in attentions if not m.is_cross_attention]
    if len(ropes) != 1 or not self_attentions:
        raise TypeError(
            f"{type(transformer).__name__}: expected one WanRotaryPosEmbed and WanAttention self-attentions"
        )
    if context.total_frames is not None and context.total_frames > ropes[0].max_seq_len:
        raise ValueError(
            f"total_frames: {context.total_frames} latent frames exceed the transformer's rotary table "
            f"({ropes[0].max_seq_len}, rope_max_seq_len)"
        )
    device = next(transformer.parameters()).device.type
    if config.flex_on(device) and not flex_available(device):
        raise ValueError(f"attn.kernel: flex needs torch >= 2.5 and, on CUDA, Triton (not found for {device}): "
                         "set attn.kernel to sdpa or auto")
    state = DenoiseState()
    tokens = FrameMajorTokens(state)
    handle = ParallelHandle(transformer, config, context, state)
    handle.hook(transformer, _TrackWanCall(context, state, config))
    handle.hook(ropes[0], _GlobalRotaryPositions(state))
    for module in transformer.modules():
        if _is_patch_embedding(module):
            handle.hook(module, _PatchEmbeddingAsMatmul(config))
    for linear in _token_path_linears(transformer):
        handle.hook(linear, PerFrameLinear(config, tokens))
    for block in transformer.modules():
        if isinstance(block, WanTransformerBlock):
            handle.hook(block, ChunkedBlock())
            handle.hook(block.ffn, PerFrameModule(config, tokens))
    embedder = transformer.condition_embedder
    if isinstance(embedder, WanTimeTextImageEmbedding):
        handle.hook(embedder.text_embedder, PerFrameModule(config, PerFrameText()))
        # Per-token timesteps (Wan2.2 TI2V): the sinusoids, the embedding MLP, its SiLU and the
        # projection to the blocks' modulation all run on token rows.
        for module in (embedder.timesteps_proj, embedder.time_embedder, embedder.act_fn, embedder.time_proj):
            handle.hook(module, PerFrameModule(config, TokenTimesteps(state)))
    for attn in self_attentions:
        handle.set_processor(attn, WanDualScopeAttnProcessor(config, context, state, ropes[0]))
    for attn in attentions:
        if attn.is_cross_attention:
            handle.set_processor(attn, WanFrameCrossAttnProcessor(attn.processor, config, state))
    logger.debug("parallelized a Wan transformer: %d self-attentions", len(self_attentions))
    return handle
