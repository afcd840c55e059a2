"""Multi-prompt videos: which prompt (or blend of two) each frame of the whole video follows.

The prompts split the whole video into consecutive segments of (nearly) equal length, whatever the
number of ranks. Across each border, ``transition_frames`` frames blend the two neighbouring text
embeddings linearly. Each frame is described by (a, b, w): embedding = lerp(E[a], E[b], w), which is
exactly E[a] when the two prompts are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .frames import partition_frames


@dataclass(frozen=True)
class FrameMix:
    """Frame follows ``lerp(E[first], E[second], weight)``."""

    first: int
    second: int
    weight: float


def frame_prompt_mix(total_frames: int, num_prompts: int, transition_frames: int = 0) -> list[FrameMix]:
    """Per global frame, the prompts it follows and the blend weight."""
    if num_prompts < 1:
        raise ValueError("at least one prompt is needed")
    num_prompts = min(num_prompts, total_frames)  # more prompts than frames: the extra ones get no frame
    segments = partition_frames(total_frames, num_prompts)
    # A transition never reaches past the middle of its neighbouring segments.
    width = min(transition_frames, min(len(s) for s in segments))
    mixes = []
    for frame in range(total_frames):
        segment = next(i for i, s in enumerate(segments) if frame in s)
        mix = FrameMix(segment, segment, 0.0)
        if width:
            for border_segment in (segment, segment + 1):  # borders at the segment's start and stop
                if not 0 < border_segment < num_prompts:
                    continue
                border = segments[border_segment].start
                start = border - width / 2
                if start <= frame < border + width / 2:
                    weight = (frame - start + 0.5) / width  # linear ramp across the border
                    mix = FrameMix(border_segment - 1, border_segment, weight)
        mixes.append(mix)
    return mixes


def unique_prompts(prompts: list[str]) -> tuple[list[str], list[int]]:
    """Distinct prompts (first-seen order) and, per prompt, its index among them.

    Encoding each distinct prompt once makes repeated prompts give bit-identical embeddings.
    """
    distinct: list[str] = []
    index = []
    for prompt in prompts:
        if prompt not in distinct:
            distinct.append(prompt)
        index.append(distinct.index(prompt))
    return distinct, index


def frame_embeddings(embeddings: torch.Tensor, mixes: list[FrameMix]) -> torch.Tensor:
    """(frames, seq, dim) embeddings for the given frames' mixes; ``embeddings`` is (prompts, seq, dim)."""
    first = embeddings[[m.first for m in mixes]]
    second = embeddings[[m.second for m in mixes]]
    weight = torch.tensor([m.weight for m in mixes], dtype=embeddings.dtype, device=embeddings.device)
    return torch.lerp(first, second, weight.view(-1, 1, 1))
