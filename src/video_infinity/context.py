"""The parallel layout: which process owns which frames of the video, and how processes talk."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .frames import partition_frames


@dataclass
class CommunicationStats:
    """Bytes this rank sent, counted by the engine itself (per kind of exchange)."""

    sent_bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent_bytes[kind] = self.sent_bytes.get(kind, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent_bytes.values())

    def reset(self) -> None:
        self.sent_bytes.clear()


@dataclass(frozen=True)
class FrameLayout:
    """How one video of ``total_frames`` frames is split over the ranks, seen from ``rank``."""

    total_frames: int
    partition: tuple[range, ...]
    rank: int

    @property
    def owned(self) -> range:
        return self.partition[self.rank]

    @classmethod
    def split(cls, total_frames: int, world_size: int, rank: int) -> "FrameLayout":
        return cls(total_frames, tuple(partition_frames(total_frames, world_size)), rank)


@dataclass(frozen=True)
class ClipContext:
    """Rank, world size, process group and the frames this rank owns.

    Created once per run and passed to whoever needs it (no module-level state). With
    ``total_frames=None`` (single process only) each UNet call's input is taken as the whole video.
    """

    rank: int = 0
    world_size: int = 1
    total_frames: int | None = None
    group: dist.ProcessGroup | None = None
    stats: CommunicationStats = field(default_factory=CommunicationStats, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.total_frames is None and self.world_size > 1:
            raise ValueError("total_frames is required when world_size > 1")
        if self.total_frames is not None:
            partition_frames(self.total_frames, self.world_size)  # raises a clear error if too few frames

    @classmethod
    def from_process_group(cls, total_frames: int, group: dist.ProcessGroup | None = None) -> "ClipContext":
        """Context for the current process in an initialised ``torch.distributed`` job."""
        if not dist.is_initialized():
            return cls(total_frames=total_frames)
        return cls(
            rank=dist.get_rank(group),
            world_size=dist.get_world_size(group),
            total_frames=total_frames,
            group=group,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def layout(self) -> FrameLayout:
        if self.total_frames is None:
            raise ValueError("this context takes the video length from each input; use layout_for()")
        return FrameLayout.split(self.total_frames, self.world_size, self.rank)

    @property
    def frames(self) -> range:
        """Global indices of the frames this rank owns."""
        return self.layout.owned

    def layout_for(self, local_frames: int) -> FrameLayout:
        """The layout for an input holding ``local_frames`` frames on this rank (checked)."""
        if self.total_frames is None:
            return FrameLayout.split(local_frames, 1, 0)
        layout = self.layout
        if local_frames != len(layout.owned):
            raise ValueError(
                f"rank {self.rank} owns frames {layout.owned.start}..{layout.owned.stop - 1} "
                f"({len(layout.owned)} frames) but the input has {local_frames} frames"
            )
        return layout

    def global_rank(self, rank: int) -> int:
        """Rank in the default group of ``rank`` in this context's group (for point-to-point ops)."""
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)


@dataclass
class DenoiseState:
    """The UNet call in progress, as the temporal modules' hooks need it.

    Owned by one ``parallelize`` handle: its UNet pre-forward hook sets it at every call, the hooks
    of the same handle read it. Never shared between models or runs.
    """

    layout: FrameLayout | None = None
    batch: int = 1
    """The UNet call's sample batch (spatial layers see ``batch * frames`` images)."""
    timestep: float = 0.0
    frame_text: torch.Tensor | None = None
    """Per-frame text embeddings (batch*frames, seq, dim) for cross-attention, or None."""
    token_timesteps: bool = False
    """The call gives every token its own timestep (a DiT's (batch, tokens) timestep, Wan2.2 TI2V)."""
    tokens_per_frame: int = 0
    """A DiT call's tokens per latent frame (frame-major token rows); 0 for a UNet."""
    step: int = 0
    """Index of the denoising step in progress (0: the schedule's first), the same on every rank:
    what rotating global frames shift by. Given by the sampling loop before each step
    (``ParallelHandle.set_step``; a resumed run gives the step it resumes at); until given (the model
    under another sampling loop, e.g. diffusers' own pipeline) counted from the calls: a call whose
    timestep differs from the previous call's starts the next step."""
    step_given: bool = False
    """Whether ``step`` comes from the sampling loop (else it is counted from the calls)."""
    counted_timestep: float | None = None
    """The previous call's timestep, while the steps are counted from the calls."""
