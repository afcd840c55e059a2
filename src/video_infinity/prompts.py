"""Multi-prompt videos: which prompt (or blend of two) each frame of the whole video follows.

Two ways to spread prompts over a video, both independent of the number of ranks:

* a list: consecutive segments of (nearly) equal length; across each border ``transition_frames``
  frames blend the two neighbouring text embeddings linearly;
* diffusers FreeNoise's ``{start_frame: prompt}`` dict (frame 0 required): by default
  (``keyframe_mode="interpolate"``) the embedding goes linearly from one keyframe's prompt to the
  next one's, and the last keyframe's prompt holds to the end, exactly as
  ``diffusers.pipelines.free_noise_utils`` interpolates; with ``keyframe_mode="hold"`` each prompt
  holds from its frame until the next keyframe, ``transition_frames`` frames blending across each
  change, as the list's segments do at their borders (a timeline of cuts and cross-fades).

Each frame is described by a :class:`FrameMix` (a, b, w): embedding = lerp(E[a], E[b], w), which is
exactly E[a] when w = 0 or the two prompts are equal. Every function here costs O(log prompts) per frame asked for.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .frames import partition_frames

Prompt = str | Sequence[str] | Mapping[int, str]
"""A prompt as the pipeline takes it: one string, a list (equal segments) or a {start_frame: prompt} dict."""


@dataclass(frozen=True)
class FrameMix:
    """Frame follows ``lerp(E[first], E[second], weight)``."""

    first: int
    second: int
    weight: float


def _segment_mix(frame: int, starts: list[int], width: int, num_segments: int) -> FrameMix:
    segment = bisect.bisect_right(starts, frame) - 1
    mix = FrameMix(segment, segment, 0.0)
    if width:
        for border_segment in (segment, segment + 1):  # borders at the segment's start and stop
            if not 0 < border_segment < num_segments:
                continue
            border = starts[border_segment]
            start = border - width / 2
            if start <= frame < border + width / 2:
                mix = FrameMix(border_segment - 1, border_segment, (frame - start + 0.5) / width)  # linear ramp
    return mix


def frame_prompt_mix(total_frames: int, num_prompts: int, transition_frames: int = 0,
                     frames: range | None = None) -> list[FrameMix]:
    """Per frame of ``frames`` (default: the whole video), the list prompts it follows and the blend weight."""
    if num_prompts < 1:
        raise ValueError("at least one prompt is needed")
    num_prompts = min(num_prompts, total_frames)  # more prompts than frames: the extra ones get no frame
    starts = [s.start for s in partition_frames(total_frames, num_prompts)]
    return held_prompt_mix(starts, total_frames, transition_frames, frames)


def held_prompt_mix(starts: Sequence[int], total_frames: int, transition_frames: int = 0,
                    frames: range | None = None) -> list[FrameMix]:
    """Segments starting at ``starts`` (sorted, the first 0; indices into them): each prompt holds
    over its segment, and ``transition_frames`` frames blend linearly across each border."""
    ends = [*starts[1:], total_frames]
    # A transition never reaches past the middle of its neighbouring segments.
    width = min([transition_frames, *(end - start for start, end in zip(starts, ends))])
    return [_segment_mix(frame, list(starts), width, len(starts)) for frame in (frames or range(total_frames))]


def keyframe_prompt_mix(keyframes: Sequence[int], total_frames: int, frames: range | None = None) -> list[FrameMix]:
    """FreeNoise's interpolation: per frame, the two keyframes around it (indices into the sorted
    ``keyframes``) and the weight ``(frame - k_i) / (k_{i+1} - k_i)``; after the last keyframe its prompt holds."""
    keys = sorted(keyframes)
    if not keys or keys[0] != 0:
        raise ValueError("prompt: a {start_frame: prompt} dict needs a prompt for frame 0")
    mixes = []
    for frame in frames or range(total_frames):
        i = bisect.bisect_right(keys, frame) - 1
        if i + 1 < len(keys):
            mixes.append(FrameMix(i, i + 1, (frame - keys[i]) / (keys[i + 1] - keys[i])))
        else:  # FreeNoise repeats the last keyframe's prompt at the last frame: it holds to the end
            mixes.append(FrameMix(i, i, 0.0))
    return mixes


def check_prompt(prompt: Prompt, total_frames: int) -> None:
    """Raise a one-line ValueError for a prompt the pipeline cannot use (before any model work)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        return
    if isinstance(prompt, Mapping):
        if not prompt:
            raise ValueError("prompt: the {start_frame: prompt} dict is empty (give at least {0: '...'})")
        bad = [k for k in prompt if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < total_frames]
        if bad:
            raise ValueError(f"prompt: dict key {bad[0]!r} is not a frame index in [0, {total_frames}) "
                             "(keys are the frames where each prompt starts)")
        if 0 not in prompt:
            raise ValueError("prompt: a {start_frame: prompt} dict needs a prompt for frame 0")
        if not all(isinstance(v, str) and v for v in prompt.values()):
            raise ValueError("prompt: every dict value must be a non-empty string")
        return
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) and p for p in prompt):
        return
    raise ValueError(f"prompt: expected a string, a non-empty list of strings or a {{start_frame: prompt}} dict, "
                     f"got {type(prompt).__name__}")


KEYFRAME_MODES = ("interpolate", "hold")
"""How a ``{start_frame: prompt}`` dict spreads over the frames (see the module's docstring)."""


def prompt_mix(prompt: Prompt, total_frames: int, frames: range, transition_frames: int = 0,
               keyframe_mode: str = "interpolate") -> tuple[list[str], list[FrameMix]]:
    """The distinct prompts to encode and, for each frame of ``frames``, its mix (indices into them).

    Encoding each distinct prompt once makes repeated prompts give bit-identical embeddings.
    """
    check_prompt(prompt, total_frames)
    if isinstance(prompt, str):
        ordered, mixes = [prompt], [FrameMix(0, 0, 0.0)] * len(frames)
    elif isinstance(prompt, Mapping):
        keys = sorted(prompt)
        ordered = [prompt[k] for k in keys]
        if keyframe_mode == "hold":
            mixes = held_prompt_mix(keys, total_frames, transition_frames, frames)
        else:
            mixes = keyframe_prompt_mix(keys, total_frames, frames)
    else:
        ordered = list(prompt)
        mixes = frame_prompt_mix(total_frames, len(ordered), transition_frames, frames)
    distinct, index = unique_prompts(ordered)
    return distinct, [FrameMix(index[m.first], index[m.second], m.weight) for m in mixes]


def unique_prompts(prompts: list[str]) -> tuple[list[str], list[int]]:
    """Distinct prompts (first-seen order) and, per prompt, its index among them."""
    positions: dict[str, int] = {}
    for prompt in prompts:
        positions.setdefault(prompt, len(positions))
    return list(positions), [positions[p] for p in prompts]


def frame_embeddings(embeddings: torch.Tensor, mixes: list[FrameMix]) -> torch.Tensor:
    """(frames, seq, dim) embeddings for the given frames' mixes; ``embeddings`` is (prompts, seq, dim)."""
    first = embeddings[[m.first for m in mixes]]
    second = embeddings[[m.second for m in mixes]]
    weight = torch.tensor([m.weight for m in mixes], dtype=embeddings.dtype, device=embeddings.device).view(-1, 1, 1)
    # lerp rather than FreeNoise's (1 - w) * a + w * b: the same line, but exact at w = 0 and 1 and
    # for two equal prompts (so repeated prompts give bit-identical embeddings)
    return torch.lerp(first, second, weight)
