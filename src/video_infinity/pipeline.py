"""One rank's part of a long video: text -> clip latents (with the engine) -> frames -> rank 0's MP4.

Every rank runs ``generate_on_rank`` with the same config; each owns one contiguous clip of the
whole video. Rank 0 also writes the outputs, receiving the other ranks' frames one rank at a time, so
it never holds the whole video.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import CheckpointPlan, load_checkpoint, restore_scheduler_state, save_checkpoint, split_scheduler_state
from .config import RunConfig
from .context import ClipContext
from .denoise import denoise, initial_latents
from .models import ModelComponents, load_model
from .engine import parallelize
from .launch import output_paths
from .prompts import frame_embeddings, frame_prompt_mix, unique_prompts
from .video_io import VideoWriter, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["generate_on_rank", "output_paths", "make_scheduler", "encode_prompts", "decode_frames"]

PROGRESS_ENV = "VIDEO_INFINITY_TEST_PROGRESS"
"""Test hook: a folder where every rank records ``rank<r>.json`` ({"pid", "step"}) after each step."""
STEP_SLEEP_ENV = "VIDEO_INFINITY_TEST_STEP_SLEEP"
"""Test hook: seconds each rank sleeps after each denoising step (to make room for a kill)."""

DECODE_CHUNK_FRAMES = 8
"""Frames decoded by the VAE at once: bounds decode memory whatever the clip length."""


class StageTimer:
    """Wall-clock seconds per pipeline stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def make_scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """The scheduler named in ``pipe_configs.scheduler``, on the model's own noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    algorithm = name.removesuffix("-karras")
    karras = name.endswith("-karras")
    if karras and scheduler_config.get("rescale_betas_zero_snr"):
        # Zero terminal SNR makes sigma_max ~4096: Karras spacing would then put every step at
        # t ~ 999 (999, 998, 998, ...), i.e. the video would never be denoised.
        logger.warning("scheduler %s: this model has a zero-terminal-SNR schedule, on which Karras sigmas "
                       "put every step at t ~ 999; using its own timestep spacing (%s)", name, algorithm)
        karras = False
    return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type=algorithm, use_karras_sigmas=karras)


def encode_prompts(components: ModelComponents, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings (len(prompts), seq, dim); too-long prompts are truncated with a warning."""
    tokenizer = components.tokenizer
    max_length = tokenizer.model_max_length
    for prompt in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > max_length:
            logger.warning("prompt truncated to the tokenizer's %d tokens (it has %d): %.60s...", max_length, length, prompt)
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return components.text_encoder(tokens.input_ids.to(device))[0]


def decode_frames(components: ModelComponents, latents: torch.Tensor, split_invariant: bool = False) -> Iterator[torch.Tensor]:
    """Decode (1, C, F, h, w) latents to uint8 frames (n, H, W, 3) in chunks of frames.

    ``split_invariant``: every VAE call gets exactly ``DECODE_CHUNK_FRAMES`` frames (the last chunk
    padded with copies of its last frame), because convolution kernels pick their algorithm by
    batch size: a frame then decodes to the same pixels whatever the clip it belongs to.
    """
    vae = components.vae
    frames = latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
    for start in range(0, frames.shape[0], DECODE_CHUNK_FRAMES):
        chunk = frames[start : start + DECODE_CHUNK_FRAMES]
        count = chunk.shape[0]
        if split_invariant and count < DECODE_CHUNK_FRAMES:
            chunk = torch.cat([chunk, chunk[-1:].expand(DECODE_CHUNK_FRAMES - count, *chunk.shape[1:])])
        with torch.no_grad():
            images = vae.decode(chunk.to(vae.dtype)).sample[:count]
        yield ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _comm_device(ctx: ClipContext, device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return device if ctx.distributed and dist.get_backend(ctx.group) == "nccl" else torch.device("cpu")


def generate_on_rank(
    config: RunConfig, model: str, ctx: ClipContext, device: torch.device, paths: dict[str, Path],
    checkpoint: CheckpointPlan | None = None,
) -> dict[str, Any] | None:
    """Generate this rank's clip; rank 0 writes the MP4, the sidecar and (optionally) the latents.

    With ``checkpoint``, rank 0 saves a checkpoint every ``checkpoint.every`` steps (the others send
    it their frames), and the run continues from ``checkpoint.resume`` when set; the checkpoint of
    this run is removed once the video is written. Returns the sidecar's content on rank 0, None
    elsewhere.
    """
    pipe = config.pipe_configs
    is_writer = ctx.rank == 0
    timer = StageTimer(device)
    dtype = config.torch_dtype
    if device.type == "cpu" and dtype != torch.float32:
        logger.warning("%s is slow or unsupported on CPU: running in float32", config.dtype)
        dtype = torch.float32
    total_frames = ctx.total_frames
    started = time.perf_counter()

    with timer.stage("load"):
        components = load_model(model, config.base_model, torch_dtype=dtype, device=device)
    with timer.stage("text"):
        distinct, index = unique_prompts(list(pipe.prompts))
        embeddings = encode_prompts(components, distinct, device)
        negative = encode_prompts(components, [""], device)
        mixes = [frame_prompt_mix(total_frames, len(pipe.prompts), pipe.transition_frames)[f] for f in ctx.frames]
        mixes = [type(m)(index[m.first], index[m.second], m.weight) for m in mixes]
        per_frame = frame_embeddings(embeddings, mixes)
        # One embedding for the whole clip takes the UNet's ordinary path; otherwise one per frame.
        text = per_frame[:1] if all(torch.equal(per_frame[0], e) for e in per_frame[1:]) else per_frame[None]

    unet = components.unet
    vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    latent_shape = (1, unet.config.in_channels, pipe.height // vae_scale, pipe.width // vae_scale)
    scheduler = make_scheduler(pipe.scheduler, components.scheduler_config)
    comm_device = _comm_device(ctx, device)
    resume = _Resume.load(checkpoint, ctx, device, dtype) if checkpoint is not None and checkpoint.resume else None
    after_step = _checkpointer(checkpoint, ctx, comm_device, paths, pipe.steps) if checkpoint is not None else None
    hooks = _TestHooks(ctx.rank)
    handle = parallelize(unet, config.plugin_configs, ctx)
    ctx.stats.reset()
    start_step = resume.step if resume is not None else 0
    progress = tqdm(total=pipe.steps, initial=start_step, desc="denoising", unit="step", disable=not is_writer,
                    leave=False)

    def on_step(index: int, latents: torch.Tensor, scheduler: Any) -> None:
        progress.update(1)
        if after_step is not None:
            after_step(index, latents, scheduler)
        hooks.step_done(index)

    with timer.stage("denoise"):
        if resume is not None:
            latents = resume.latents
            logger.info("resuming from %s at step %d of %d", checkpoint.resume, resume.step, pipe.steps)
        else:
            latents = initial_latents(config.seed, ctx.frames, latent_shape, scheduler.init_noise_sigma, dtype, device)
        with torch.no_grad():
            latents = denoise(
                unet, scheduler, latents, text,
                negative_embeds=negative, guidance_scale=pipe.guidance_scale, eta=pipe.eta,
                seed=config.seed, frames=ctx.frames, num_steps=pipe.steps,
                unet_kwargs={"fps": pipe.fps} if components.fps_conditioned else None,
                start_step=start_step, restore_scheduler=resume.restore if resume is not None else None,
                after_step=on_step,
            )
    progress.close()
    handle.remove()
    comm_bytes = ctx.stats.total

    if pipe.save_latents:
        with timer.stage("save_latents"):
            _gather_latents(latents, ctx, comm_device, paths["latents"] if is_writer else None)

    with timer.stage("decode_and_write"):
        chunks = decode_frames(components, latents, config.plugin_configs.split_invariant_on(latents.device.type))
        if is_writer:
            with VideoWriter(paths["video"], pipe.width, pipe.height, pipe.export_fps) as writer:
                for chunk in chunks:
                    writer.write(chunk.cpu().numpy())
                for rank in range(1, ctx.world_size):
                    for shape in _chunk_shapes(len(ctx.layout.partition[rank]), pipe.height, pipe.width):
                        buffer = torch.empty(shape, dtype=torch.uint8, device=comm_device)
                        dist.recv(buffer, src=ctx.global_rank(rank), group=ctx.group)
                        writer.write(buffer.cpu().numpy())
        else:
            for chunk in chunks:
                dist.send(chunk.to(comm_device), dst=ctx.global_rank(0), group=ctx.group)

    elapsed = time.perf_counter() - started
    report = {"rank": ctx.rank, "seconds": timer.seconds, "peak_memory_bytes": _peak_memory_bytes(device),
              "bytes_sent": comm_bytes, "bytes_sent_by_kind": dict(ctx.stats.sent_bytes), "device": str(device)}
    reports = [report]
    if ctx.distributed:
        reports = [None] * ctx.world_size if is_writer else None
        dist.gather_object(report, reports, dst=ctx.global_rank(0), group=ctx.group)
    if not is_writer:
        return None
    sidecar = _sidecar(config, model, components, ctx, reports, elapsed, paths)
    sidecar["resumed_from"] = (
        {"checkpoint": str(checkpoint.resume), "step": start_step} if checkpoint is not None and checkpoint.resume else None
    )
    write_json_atomic(paths["sidecar"], sidecar)
    if checkpoint is not None and checkpoint.path.exists():
        checkpoint.path.unlink()  # the video is complete: its checkpoint is no longer needed
        logger.info("removed the checkpoint %s (the video is complete)", checkpoint.path)
    logger.info(
        "wrote %s: %d frames %dx%d at %d fps in %.1f s (%.2f frames/s) on %d rank(s)",
        paths["video"], total_frames, pipe.width, pipe.height, pipe.export_fps, elapsed, total_frames / elapsed, ctx.world_size,
    )
    return sidecar


def _chunk_shapes(frames: int, height: int, width: int) -> Iterator[tuple[int, int, int, int]]:
    for start in range(0, frames, DECODE_CHUNK_FRAMES):
        yield (min(DECODE_CHUNK_FRAMES, frames - start), height, width, 3)


def _gather_frames(tensor: torch.Tensor, ctx: ClipContext, comm_device: torch.device) -> torch.Tensor | None:
    """The whole video's ``tensor`` (batch, C, frames, ...) on rank 0 (CPU); None on the other ranks."""
    local = tensor.to(comm_device).contiguous()
    if not ctx.distributed:
        return local.cpu()
    if ctx.rank != 0:
        dist.send(local, dst=ctx.global_rank(0), group=ctx.group)
        return None
    parts = [local]
    for rank in range(1, ctx.world_size):
        shape = local.shape[:2] + (len(ctx.layout.partition[rank]),) + local.shape[3:]
        buffer = torch.empty(shape, dtype=local.dtype, device=comm_device)
        dist.recv(buffer, src=ctx.global_rank(rank), group=ctx.group)
        parts.append(buffer)
    return torch.cat(parts, dim=2).cpu()


def _gather_latents(latents: torch.Tensor, ctx: ClipContext, comm_device: torch.device, path: Path | None) -> None:
    """Rank 0 saves the whole video's final latents, float32 (channels, frames, h, w)."""
    whole = _gather_frames(latents.float(), ctx, comm_device)
    if whole is None:
        return
    assert path is not None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, whole[0].numpy())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Resume:
    """This rank's part of a checkpoint: latents after ``step`` steps and the scheduler's state."""

    def __init__(self, step: int, latents: torch.Tensor, state: dict[str, Any], tensors: list[torch.Tensor],
                 device: torch.device) -> None:
        self.step, self.latents, self.state, self.tensors, self.device = step, latents, state, tensors, device

    @classmethod
    def load(cls, plan: CheckpointPlan, ctx: ClipContext, device: torch.device, dtype: torch.dtype) -> _Resume:
        assert plan.resume is not None
        data = load_checkpoint(plan.resume)
        frames = ctx.frames
        own = slice(frames.start, frames.stop)
        latents = data["latents"][:, :, own].to(device=device, dtype=dtype).clone()
        tensors = [t[:, :, own].clone() for t in data["scheduler_tensors"]]
        return cls(int(data["step"]), latents, data["scheduler"], tensors, device)

    def restore(self, scheduler: Any) -> None:
        restore_scheduler_state(scheduler, self.state, self.tensors, self.device)


def _checkpointer(plan: CheckpointPlan, ctx: ClipContext, comm_device: torch.device, paths: dict[str, Path],
                  num_steps: int) -> Any:
    """The after-step callback that saves a checkpoint every ``plan.every`` steps (None: never)."""
    if plan.every is None:
        return None
    stem = paths["video"].stem

    def after_step(index: int, latents: torch.Tensor, scheduler: Any) -> None:
        done = index + 1
        if done % plan.every:
            return
        state, tensors = split_scheduler_state(scheduler, tuple(latents.shape))
        whole_latents = _gather_frames(latents, ctx, comm_device)
        whole_tensors = [_gather_frames(t, ctx, comm_device) for t in tensors]
        if ctx.rank != 0:
            return
        assert whole_latents is not None
        started = time.perf_counter()
        save_checkpoint(plan.path, latents=whole_latents, scheduler_state=state,
                        scheduler_tensors=whole_tensors, step=done, num_steps=num_steps, plan=plan,  # type: ignore[arg-type]
                        file_stem=stem, world_size=ctx.world_size)
        logger.debug("checkpoint at step %d saved to %s in %.2f s", done, plan.path, time.perf_counter() - started)

    return after_step


class _TestHooks:
    """Test-only hooks, off unless their environment variables are set (see PROGRESS_ENV)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        folder = os.environ.get(PROGRESS_ENV)
        self.folder = Path(folder) if folder else None
        self.sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)

    def step_done(self, index: int) -> None:
        if self.folder is not None:
            target = self.folder / f"rank{self.rank}.json"
            tmp = self.folder / f".rank{self.rank}.tmp"
            tmp.write_text(json.dumps({"pid": os.getpid(), "step": index + 1}))
            os.replace(tmp, target)
        if self.sleep:
            time.sleep(self.sleep)


def _sidecar(config: RunConfig, model: str, components: ModelComponents, ctx: ClipContext,
             reports: list[dict], elapsed: float, paths: dict[str, Path]) -> dict[str, Any]:
    import diffusers

    total = ctx.total_frames
    return {
        "video": paths["video"].name,
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "model": components.source,
        "model_path": model,
        "fps_conditioned": components.fps_conditioned,
        "total_frames": total,
        "world_size": ctx.world_size,
        "frames_per_rank": [len(c) for c in ctx.layout.partition],
        "versions": {"video_infinity": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "seconds": {"total": elapsed, **reports[0]["seconds"]},
        "frames_per_second": total / elapsed,
        "peak_memory_bytes": [r["peak_memory_bytes"] for r in reports],
        "bytes_sent": [r["bytes_sent"] for r in reports],
        "bytes_sent_by_kind": [r["bytes_sent_by_kind"] for r in reports],
        "devices": [r["device"] for r in reports],
        "latents": paths["latents"].name if config.pipe_configs.save_latents else None,
    }
