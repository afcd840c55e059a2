"""What a run needs, known before any weight loads: per rank, the peak memory of each stage (prompt
encoding, one denoising step, VAE decode) and the FLOPs, computed by running the project's own code
on meta tensors built from the model folder's config files alone (a folder holding only the JSON
configs works), then a verdict against a GPU's memory.

A rank's denoising step runs through the engine exactly as on that rank: ``parallelize`` with the
run's settings, in a fake process group (torch's ``fake`` backend) as rank r of W, so every halo
and global-frame buffer the exchange allocates is counted. Memory is counted tensor by tensor
(:mod:`video_infinity.memory`: attention as a flash kernel allocates); a GPU adds the CUDA context
and the caching allocator's slack, for which the verdict keeps ``HEADROOM`` of the card free.

Families plan through their own ``plan`` module (``families/<name>/plan.py``); Wan has one.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from .context import ClipContext
from .run.config import RunConfig

logger = logging.getLogger(__name__)

HEADROOM = 0.10
"""Share of a GPU's memory a plan leaves free: the CUDA context, the allocator's rounding and slack."""
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""World sizes a refused plan tries for its "needs N ranks" (the rank with the most frames each)."""


@dataclass(frozen=True)
class Stage:
    name: str
    weights_bytes: int
    """Weights resident during the stage."""
    working_bytes: int
    """Peak of the tensors the stage creates (activations, buffers)."""
    flops: int

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.working_bytes


@dataclass(frozen=True)
class RankPlan:
    rank: int
    latent_frames: int
    stages: tuple[Stage, ...]

    @property
    def peak_bytes(self) -> int:
        return max(stage.peak_bytes for stage in self.stages)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


@dataclass(frozen=True)
class Plan:
    model: str
    family: str
    world_size: int
    frames: int
    latent_frames: int
    steps: int
    ranks: tuple[RankPlan, ...]
    gpu_memory: int | None
    needs_ranks: int | None = None
    """With ``gpu_memory``: the fewest ranks (of ``WORLD_SIZES``) whose every stage fits, when this
    world size does not; None when it fits or when no world size up to 64 does (then: offload)."""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(rank.peak_bytes for rank in self.ranks)

    @property
    def step_flops(self) -> int:
        """FLOPs of one denoising step, all ranks together."""
        return sum(rank.stage("denoising step").flops for rank in self.ranks)

    @property
    def total_flops(self) -> int:
        return sum(stage.flops for rank in self.ranks for stage in rank.stages) + (self.steps - 1) * self.step_flops

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak_bytes <= (1 - HEADROOM) * self.gpu_memory

    @property
    def verdict(self) -> str:
        if self.fits is None:
            return "no GPU memory given (--gpu-memory): no verdict"
        if self.fits:
            return f"fits: {gib(self.peak_bytes)} of {gib(self.gpu_memory)} per GPU at most"
        if self.needs_ranks is not None:
            return f"does not fit on {self.world_size} GPU(s): needs {self.needs_ranks} ranks"
        return "does not fit on up to 64 GPUs of this size: needs offload (fewer frames, a smaller size or dtype)"

    def as_dict(self) -> dict:
        return {
            "model": self.model, "family": self.family, "world_size": self.world_size, "frames": self.frames,
            "latent_frames": self.latent_frames, "steps": self.steps, "gpu_memory_bytes": self.gpu_memory,
            "peak_bytes": self.peak_bytes, "fits": self.fits, "needs_ranks": self.needs_ranks, "verdict": self.verdict,
            "flops_per_step": self.step_flops, "flops_total": self.total_flops, "notes": self.notes,
            "ranks": [{"rank": r.rank, "latent_frames": r.latent_frames, "peak_bytes": r.peak_bytes,
                       "stages": [{"name": s.name, "weights_bytes": s.weights_bytes, "working_bytes": s.working_bytes,
                                   "peak_bytes": s.peak_bytes, "flops": s.flops} for s in r.stages]}
                      for r in self.ranks],
        }

    def describe(self) -> str:
        lines = [f"{self.family} model {self.model}: {self.frames} frames ({self.latent_frames} latent) on "
                 f"{self.world_size} rank(s), {self.steps} steps"]
        for rank in self.ranks:
            parts = ", ".join(f"{s.name} {gib(s.peak_bytes)} ({gib(s.weights_bytes)} weights)" for s in rank.stages)
            lines.append(f"  rank {rank.rank} ({rank.latent_frames} latent frames): {parts}")
        lines.append(f"  compute: {self.step_flops / 1e12:.1f} TFLOP per step, {self.total_flops / 1e15:.2f} PFLOP "
                     f"for the run")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(self.verdict)
        return "\n".join(lines)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


@contextmanager
def _as_rank(rank: int, world_size: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world_size`` in a fake process group (collectives do nothing)."""
    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("planning several ranks needs a process without a process group")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _planner(family: str):
    try:
        return importlib.import_module(f".families.{family}.plan", __package__)
    except ModuleNotFoundError:
        return None


def _ranks_to_plan(world_size: int) -> list[int]:
    """Every rank up to 8; beyond, the first two, a middle one and the last (halos on both sides or one)."""
    return list(range(world_size)) if world_size <= 8 else sorted({0, 1, world_size // 2, world_size - 1})


def plan_run(config: RunConfig, gpu_memory: int | None = None, world_size: int | None = None,
             search: bool = True) -> Plan:
    """The plan of ``config``'s run on ``world_size`` ranks (default: its devices' count)."""
    from .demo import resolve_model
    from .errors import UserError
    from .families import detect

    try:
        model = resolve_model(config.model) if config.model is not None else None  # "demo-wan": its folder
    except UserError as exc:  # an embedded model this installation lacks
        raise ValueError(str(exc)) from None
    if model is None or not Path(model).is_dir():
        raise ValueError(f"model: planning needs a local model folder (its config files), got {model!r}")
    folder = Path(model)
    facts = detect(folder)
    family = facts.family if facts is not None else None
    planner = _planner(family) if family is not None else None
    if planner is None:
        raise ValueError(f"model: memory planning is available for Wan folders only, not {family or 'this folder'}")
    world = world_size or config.world_size
    pipe = config.pipe_configs
    dtype = config.torch_dtype
    components = planner.meta_components(folder, dtype)
    latent_frames = facts.latent_frames(pipe.total_frames_for(world))
    scale = facts.spatial_factor
    # the model's input channels (image-to-video: the mask and image latents concatenated)
    latent_shape = (components["transformer"].config.in_channels, pipe.height // scale, pipe.width // scale)
    prompts = pipe.prompts if isinstance(pipe.prompts, list) else list(pipe.prompts.values())
    per_frame_text = len(set(prompts)) > 1
    guidance = pipe.guidance_scale > 1.0

    text_weights, text_call = planner.text_stage(folder, dtype, len(set(prompts)))
    decode_weights, decode_call = planner.decode_stage(components, latent_shape)
    images = [name for name in ("image", "last_image") if getattr(pipe, name) is not None]
    conditioned = facts.image_mode is not None and (images or pipe.video is not None)
    clip = None
    if conditioned and (folder / "image_encoder" / "config.json").is_file():
        clip = planner.clip_stage(folder, max(1, len(images)))
    if conditioned:
        _, encode_call, field = planner.encode_stage(components, latent_shape)  # the VAE is resident already

    def rank_plan(rank: int, world: int) -> RankPlan:
        with _as_rank(rank, world):
            ctx = ClipContext.from_process_group(latent_frames) if world > 1 else ClipContext(total_frames=latent_frames)
            weights, step = planner.denoise_stage(components, config.plugin_configs, ctx, latent_shape,
                                                  per_frame_text, guidance, image_tokens=clip[2] * len(images) if clip else 0)
        # The transformers and the VAE stay on the device from loading to the end; the text encoder joins
        # them while it encodes.
        resident = weights + decode_weights
        stages = [Stage("denoising step", resident, step.peak_bytes, step.flops),
                  Stage("VAE decode", resident, decode_call.peak_bytes, decode_call.flops * len(ctx.frames))]
        if conditioned:
            # each rank encodes its own latent frames after the encoder's warm-up; CLIP on rank 0 first
            encoded = len(ctx.frames) + min(field, ctx.frames.start)
            image_stage = Stage("image conditioning", resident, encode_call.peak_bytes, encode_call.flops * encoded)
            if rank == 0 and clip is not None:
                image_stage = Stage("image conditioning", resident + clip[0],
                                    max(encode_call.peak_bytes, clip[1].peak_bytes), image_stage.flops + clip[1].flops)
            stages.insert(0, image_stage)
        if rank == 0:
            stages.insert(0, Stage("prompt encoding", resident + text_weights, text_call.peak_bytes, text_call.flops))
        return RankPlan(rank, len(ctx.frames), tuple(stages))

    ranks = tuple(rank_plan(rank, world) for rank in _ranks_to_plan(world))
    notes = ["the text encoder runs on rank 0 and then leaves the GPU; the VAE decodes one latent frame at a time"]
    if world > 8:
        notes.append(f"ranks {', '.join(str(r.rank) for r in ranks)} planned (the others lie between)")
    plan = Plan(str(folder), family, world, config.pipe_configs.total_frames_for(world), latent_frames, pipe.steps,
                ranks, gpu_memory, notes=notes)
    budget = None if gpu_memory is None else (1 - HEADROOM) * gpu_memory
    if search and plan.fits is False and min(s.weights_bytes for s in ranks[0].stages) < budget:
        # (more ranks do not help when the weights alone do not fit)
        for candidate in (w for w in WORLD_SIZES if world < w <= latent_frames):
            middle = candidate // 2
            if rank_plan(middle, candidate).peak_bytes <= budget and rank_plan(0, candidate).peak_bytes <= budget:
                plan = Plan(**{**plan.__dict__, "needs_ranks": candidate})
                break
    return plan


def gpu_memory_of(config: RunConfig) -> int | None:
    """The smallest memory of the run's GPUs (None for CPU runs or without CUDA)."""
    if config.uses_cpu or not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(int(d)).total_memory for d in config.devices)


def refusal(plan: Plan) -> str | None:
    """One line refusing a run that cannot fit (None when it fits or no verdict)."""
    if plan.fits is not False:
        return None
    worst = max(plan.ranks, key=lambda r: r.peak_bytes)
    stage = max(worst.stages, key=lambda s: s.peak_bytes)
    return (f"devices: the run needs {gib(plan.peak_bytes)} on rank {worst.rank} ({stage.name}: "
            f"{gib(stage.weights_bytes)} weights + {gib(stage.working_bytes)} working), more than "
            f"{gib((1 - HEADROOM) * plan.gpu_memory)} ({100 - HEADROOM * 100:.0f}% of {gib(plan.gpu_memory)}); "
            + (f"use {plan.needs_ranks} GPUs" if plan.needs_ranks else "use fewer frames, a smaller size or dtype")
            + " (video-infinity plan shows each stage)")


__all__ = ["HEADROOM", "Plan", "RankPlan", "Stage", "gib", "gpu_memory_of", "plan_run", "refusal"]
