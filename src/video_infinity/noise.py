"""Per-frame deterministic noise: frame f's noise depends only on (seed, stream, f).

So the same seed gives the same video whatever the number of ranks: each rank draws the noise of
the frames it owns, and nobody's draw depends on anybody else's.
"""

from __future__ import annotations

import numpy as np
import torch

INITIAL = 0
"""Stream of the initial latents; scheduler step ``i`` uses stream ``i + 1``."""


def frame_seed(seed: int, stream: int, frame: int) -> int:
    """A 63-bit seed for one frame of one noise stream, well mixed (SeedSequence hashing)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, stream, frame]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def frame_noise(
    seed: int,
    frames: range,
    shape: tuple[int, ...],
    stream: int = INITIAL,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise for ``frames``: shape ``(shape[0], shape[1], len(frames), *shape[2:])``.

    ``shape`` is one frame's (batch, channels, height, width). Drawn on the CPU in float32 so that
    every device and dtype sees the same numbers.
    """
    per_frame = []
    for frame in frames:
        generator = torch.Generator(device="cpu").manual_seed(frame_seed(seed, stream, frame))
        per_frame.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(per_frame, dim=2).to(device=device, dtype=dtype)
