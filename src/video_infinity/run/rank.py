"""The rank entry point of a CLI run: set up the device and process group, then generate this
rank's clip with :class:`~video_infinity.pipeline.VideoInfinityPipeline` (``generate_latents`` and
``stream_frames``: the same path as the Python API), with checkpoints and resume; rank 0 streams
the video into the MP4 and writes the sidecar and, optionally, the latents. Checkpoints and resume
are the pipeline's own (:meth:`~video_infinity.pipeline.VideoInfinityPipeline.generate_latents` with a
:class:`~video_infinity.checkpoint.CheckpointSpec`, :meth:`~VideoInfinityPipeline.resume_point`).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..atomic import atomic_output, write_json_atomic
from ..checkpoint import CheckpointSpec
from ..context import ClipContext
from ..engine.comm import gather_frames
from ..pipeline import VideoInfinityPipeline
from ..request import GenerationRequest
from ..video_io import VideoWriter
from .checkpoint import CheckpointPlan
from .config import RunConfig
from .contract import RunChannel
from .progress import ProgressReporter

logger = logging.getLogger(__name__)



def device_name(config: RunConfig, local_rank: int) -> str:
    """The torch device of the process with this local rank."""
    if config.uses_cpu:
        return "cpu"
    gpu = config.devices[local_rank] if len(config.devices) > local_rank else local_rank
    return f"cuda:{gpu}"


def configure_rank_logging(rank: int, level: int) -> None:
    """Prefix log lines with the rank; ranks other than 0 log warnings only. Reuses the process's
    handlers (the CLI's), adding one only to a fresh process."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    root.setLevel(level if rank == 0 else logging.WARNING)


def run_rank(rank: int, world_size: int, local_rank: int, config: RunConfig, model: str,
             paths: dict[str, Path], local_world: int, plan: CheckpointPlan | None = None,
             channel: RunChannel | None = None, store_port: int | None = None,
             store_socket: socket.socket | None = None) -> dict[str, Any] | None:
    """Join the process group (if several ranks) and generate this rank's part; the sidecar on rank 0.
    ``channel``: where the rank reports its progress. ``store_port`` (the built-in launcher's ranks):
    the port of the rendezvous store on this host, which rank 0 serves on ``store_socket``, the
    listening socket the launcher bound (else ``env://``: torchrun's variables).

    The process's torch thread count is restored afterwards (a single rank runs in the caller's process).
    """
    device = torch.device(device_name(config, local_rank))
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" and config.plugin_configs.split_invariant_on("cpu"):
            # Small BLAS/oneDNN products round by thread count: the same count on every world size
            # keeps the video bit-identical whatever the number of ranks.
            torch.set_num_threads(1)
        elif device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        else:
            torch.cuda.set_device(device)
        if world_size > 1 and not dist.is_initialized():
            timeout = timedelta(seconds=config.collective_timeout_s)
            store = {}
            if store_port is not None:  # rank 0's store takes the launcher's socket (its fd) over
                store["store"] = dist.TCPStore(
                    "127.0.0.1", store_port, world_size, is_master=store_socket is not None, timeout=timeout,
                    master_listen_fd=store_socket.detach() if store_socket is not None else None)
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world_size,
                                    timeout=timeout, **store, **({"device_id": device} if device.type == "cuda" else {}))
        ctx = ClipContext.from_process_group(config.pipe_configs.total_frames_for(world_size))
        sidecar = generate_on_rank(config, model, ctx, device, paths, plan, channel)
        if dist.is_initialized():  # on success only: after a failure the peers may never answer
            dist.destroy_process_group()
        return sidecar
    finally:
        torch.set_num_threads(threads)


class StageTimer:
    """Wall-clock seconds per stage of a run."""

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


def generate_on_rank(config: RunConfig, model: str, ctx: ClipContext, device: torch.device, paths: dict[str, Path],
                     checkpoint: CheckpointPlan | None = None,
                     channel: RunChannel | None = None) -> dict[str, Any] | None:
    """Generate this rank's clip; rank 0 writes the MP4, the sidecar and (optionally) the latents.

    With ``checkpoint``, rank 0 saves a checkpoint every ``checkpoint.every`` steps (the others send
    it their frames), and the run continues from ``checkpoint.resume`` when set; the checkpoint of
    this run is removed once the video is written. ``channel``: where the rank reports its progress
    (and the test-only sleep after each step). Returns the sidecar's content on rank 0, None
    elsewhere.
    """
    pipe_config = config.pipe_configs
    is_writer = ctx.rank == 0
    timer = StageTimer(device)
    dtype = config.torch_dtype
    if device.type == "cpu" and dtype != torch.float32:
        logger.warning("%s is slow or unsupported on CPU: running in float32", config.dtype)
        dtype = torch.float32
    started = time.perf_counter()
    channel = channel or RunChannel()
    progress = ProgressReporter(ctx.rank, ctx.world_size, channel.folder)
    with timer.stage("load"):
        pipe = VideoInfinityPipeline.from_pretrained(model, base_model=config.base_model,
                                                     motion_adapter=config.motion_adapter, engine=config.plugin_configs,
                                                     torch_dtype=dtype, device=device)
    request = config.request
    if request.num_frames != config.pipe_configs.total_frames_for(ctx.world_size):  # torchrun: its world size
        request = request.model_copy(update={"num_frames": config.pipe_configs.total_frames_for(ctx.world_size)})
    images = pipe.checked_images(request, world_size=ctx.world_size)
    latent_frames = pipe.latent_frames(request)
    if ctx.total_frames != latent_frames:  # the engine counts the model's frames (Wan: latent frames)
        ctx = ClipContext.from_process_group(latent_frames, ctx.group)
    scheduler = pipe.make_scheduler(request.scheduler)
    seed = pipe.shared_seed(request.seed, ctx)  # a config's seed is always given: no draw, no collective
    resume = spec = None
    if checkpoint is not None and (checkpoint.resume is not None or checkpoint.every is not None):
        # The pipeline's fingerprint of this request: preflight checked --resume against the same parts.
        parts = pipe.checkpoint_fingerprint(request, seed=seed, scheduler=request.scheduler,
                                            engine=request.engine_for(pipe.engine))
        if checkpoint.resume is not None:
            label = f"--resume {checkpoint.resume}"
            resume = pipe.resume_point(pipe.read_checkpoint(checkpoint.resume, ctx, label=label), parts, ctx,
                                       label=label)
        if checkpoint.every is not None:
            spec = CheckpointSpec(checkpoint.path, checkpoint.every, parts, extra={"file_stem": paths["video"].stem})
    sleep = channel.step_sleep_s

    def on_step_done(index: int) -> None:  # after the step's checkpoint: a stop now keeps this step
        progress.step_done(index)
        if sleep:
            time.sleep(sleep)

    ctx.stats.reset()
    progress.denoising(request.num_inference_steps, resume.step if resume is not None else 0)
    with timer.stage("denoise"):
        if resume is not None:
            logger.info("resuming from %s at step %d of %d", checkpoint.resume, resume.step, request.num_inference_steps)
            latents = resume.latents
        else:
            latents = pipe.initial_latents(request, ctx, scheduler, seed)
        latents = pipe.generate_latents(request, ctx, scheduler, latents, seed=seed,
                                        start_step=resume.step if resume is not None else 0,
                                        restore_scheduler=resume.restore if resume is not None else None,
                                        checkpoint=spec, on_step_done=on_step_done, images=images)
    comm_bytes = ctx.stats.total

    if pipe_config.save_latents:
        with timer.stage("save_latents"):
            whole = gather_frames(latents.float(), ctx, device)
            if whole is not None:
                with atomic_output(paths["latents"]) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, whole[0].numpy())

    progress.phase("decoding")
    with timer.stage("decode_and_write"):
        chunks = pipe.stream_frames(latents, ctx, uint8=True)
        if is_writer:
            with VideoWriter(paths["video"], request.width, request.height, pipe_config.export_fps) as writer:
                for chunk in chunks:
                    writer.write(chunk.cpu().numpy())
        else:
            for _ in chunks:  # sends this rank's frames to rank 0
                pass

    elapsed = time.perf_counter() - started
    report = {"rank": ctx.rank, "seconds": timer.seconds, "peak_memory_bytes": _peak_memory_bytes(device),
              "bytes_sent": comm_bytes, "bytes_sent_by_kind": dict(ctx.stats.sent_bytes), "device": str(device)}
    reports: list[Any] | None = [report]
    if ctx.distributed:
        reports = [None] * ctx.world_size if is_writer else None
        dist.gather_object(report, reports, dst=ctx.global_rank(0), group=ctx.group)
    if not is_writer:
        progress.phase("done")
        return None
    assert reports is not None
    sidecar = _sidecar(config, request, model, pipe, ctx, reports, elapsed, paths)
    sidecar["resumed_from"] = None if resume is None else {
        "checkpoint": str(checkpoint.resume), "step": resume.step, "saved_by_world_size": resume.saved_world_size,
        "world_size": ctx.world_size}
    write_json_atomic(paths["sidecar"], sidecar)
    if checkpoint is not None and checkpoint.path.exists():
        checkpoint.path.unlink()  # the video is complete: its checkpoint is no longer needed
        logger.info("removed the checkpoint %s (the video is complete)", checkpoint.path)
    progress.phase("done")
    total = request.num_frames
    logger.info("wrote %s: %d frames %dx%d at %d fps in %.1f s (%.2f frames/s) on %d rank(s)", paths["video"], total,
                request.width, request.height, pipe_config.export_fps, elapsed, total / elapsed, ctx.world_size)
    return sidecar


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _sidecar(config: RunConfig, request: GenerationRequest, model: str, pipe: VideoInfinityPipeline,
             ctx: ClipContext, reports: list[dict], elapsed: float, paths: dict[str, Path]) -> dict[str, Any]:
    import diffusers

    family = pipe.family
    total = request.num_frames
    return {
        "video": paths["video"].name,
        "request": request.model_dump(mode="json"),  # what was generated, as the Python call takes it
        "config": config.model_dump(mode="json"),  # the run as a config file (what "use these settings" reads)
        "seed": request.seed,
        "model": family.source,
        "model_path": model,
        "family": family.name,
        "fps_conditioned": bool(getattr(family, "fps_conditioned", False)),
        "total_frames": total,
        "world_size": ctx.world_size,
        "frames_per_rank": [len(c) for c in ctx.layout.partition],  # the model's frames (Wan: latent frames)
        # Video frames per latent frame after the first (Wan: 4; the frames before latent frame L: video_frames(L)).
        "temporal_compression": family.video_frames(2) - family.video_frames(1),
        # The first video frame of every rank's clip but the first (what the probe's --ranks checks).
        "clip_borders": [family.video_frames(c.start) for c in ctx.layout.partition[1:]],
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
