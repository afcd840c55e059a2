"""Start the ranks: in this process (one device), one spawned process per device, or join torchrun.

Pre-flight checks (outputs, model) run once here, before any process starts. A failed rank stops the
whole run: the others are terminated and one line names the rank and its error.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import ConfigError, RunConfig
from .context import ClipContext

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits on its peers in one collective (a slow VAE decode on rank 0 included)."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    """``preferred`` when free, else a free port chosen by the OS."""
    if _port_is_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logger.warning("master_port %d is taken: using %d", preferred, port)
    return port


def resolve_model(config: RunConfig) -> str:
    """The model folder or hub id; without one, the embedded demo model."""
    if config.model is not None:
        return config.model
    from .demo import default_model_path

    return str(default_model_path())


def _preflight(config: RunConfig, overwrite: bool) -> dict[str, Path]:
    from .pipeline import output_paths

    paths = output_paths(config)
    base = Path(config.base_path)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"base_path: cannot create {base}: {exc.strerror}") from None
    if not os.access(base, os.W_OK):
        raise ConfigError(f"base_path: {base} is not writable (choose another folder)")
    if paths["video"].exists() and not overwrite:
        raise ConfigError(f"pipe_configs.file_name: {paths['video']} exists (pass --overwrite or choose another file_name)")
    return paths


def _in_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _setup_logging(rank: int) -> None:
    level = logging.getLogger().level or logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)


def _run_rank(rank: int, world_size: int, local_rank: int, config: RunConfig, model: str,
              paths: dict[str, Path], local_world: int) -> None:
    from .pipeline import generate_on_rank

    if config.uses_cpu:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        gpu = config.devices[local_rank] if len(config.devices) > local_rank else local_rank
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
    try:
        ctx = ClipContext.from_process_group(config.pipe_configs.total_frames_for(world_size))
        generate_on_rank(config, model, ctx, device, paths)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned_rank(rank: int, world_size: int, port: int, config: RunConfig, model: str, paths: dict[str, Path],
                  log_level: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    logging.getLogger().setLevel(log_level)
    _setup_logging(rank)
    _run_rank(rank, world_size, rank, config, model, paths, world_size)


def launch(config: RunConfig, overwrite: bool = False) -> int:
    """Run the whole generation; returns the process exit code."""
    paths = _preflight(config, overwrite)
    model = resolve_model(config)
    if _in_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        config.pipe_configs.check_world_size(world_size)
        _setup_logging(rank)
        logger.info("joining the torchrun job: %d ranks (devices from torchrun, not the config)", world_size)
        _run_rank(rank, world_size, local_rank, config, model, paths, local_world)
        return 0
    world_size = config.world_size
    logger.info("%d rank(s) on %s, %d frames", world_size, "CPU" if config.uses_cpu else f"GPUs {config.devices}",
                config.total_frames)
    if world_size == 1:
        _run_rank(0, 1, 0, config, model, paths, 1)
        return 0
    port = pick_port(config.master_port)
    context = mp.start_processes(
        _spawned_rank, args=(world_size, port, config, model, paths, logging.getLogger().level or logging.INFO),
        nprocs=world_size, start_method="spawn", join=False,
    )
    try:
        while not context.join():
            pass
    except mp.ProcessRaisedException as exc:
        logger.error("rank %d failed: %s", exc.error_index, _last_line(str(exc)))
        return 1
    except mp.ProcessExitedException as exc:
        logger.error("rank %d died (exit code %s)", exc.error_index, exc.exit_code)
        return 1
    return 0


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `video-infinity generate --config FILE`")
