"""Running ``video-infinity generate``: pre-flight checks, then the ranks (in this process for one
device, one supervised process per device, or this process's part of a torchrun job).

Modules: ``config`` (the run config), ``outputs`` (what a run writes, and what it may not replace),
``preflight`` (checks before any rank starts), ``checkpoint`` (save / resume), ``supervise``
(process supervision, signals, temporary files), ``progress`` (each rank's live progress, for
front-ends), ``failures`` (what a rank's exception means for
the user), ``rank`` (one rank's work, on :class:`~video_infinity.pipeline.VideoInfinityPipeline`).
Importing this package does not import torch: a refused run fails fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import RunError, RunInterrupted, UserError
from .config import RunConfig
from .failures import describe_failure
from .hooks import STEP_SLEEP_ENV
from .preflight import prepare
from .progress import PROGRESS_DIR_ENV
from .supervise import (
    Terminated,
    checkpoint_note,
    remove_new_temp_files,
    run_spawned,
    sigterm_as_interrupt,
    signals_deferred,
    temp_files,
)

logger = logging.getLogger(__name__)


__all__ = ["PROGRESS_DIR_ENV", "STEP_SLEEP_ENV", "launch"]


def _in_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def launch(config: RunConfig, overwrite: bool = False, resume: str | os.PathLike[str] | None = None,
           config_path: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Run the whole generation; returns the paths of the files written (on rank 0; {} on the other
    torchrun ranks). Raises a one-line :class:`UserError` (refused: exit 2), :class:`RunError` (a rank
    failed) or :class:`RunInterrupted`. ``config_path``: the config file being run, never an output."""
    with sigterm_as_interrupt():
        if _in_torchrun():
            return _launch_torchrun(config, overwrite, resume, config_path)
        paths, model, plan = prepare(config, overwrite, resume, config_path=config_path)
        world_size = config.world_size
        logger.info("%d rank(s) on %s, %d frames", world_size, "CPU" if config.uses_cpu else f"GPUs {config.devices}",
                    config.total_frames)
        before = temp_files(paths)
        try:
            if world_size == 1:
                _run_here(config, model, paths, plan)
            else:
                run_spawned(config, model, paths, plan)
        except KeyboardInterrupt as exc:
            with signals_deferred():
                remove_new_temp_files(paths, before)
                what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
                stopped = f"all {world_size} ranks stopped" if world_size > 1 else "stopped"
                raise RunInterrupted(f"{what}: {stopped}; {checkpoint_note(plan)}",
                                     143 if isinstance(exc, Terminated) else 130) from None
        except RunError as exc:
            remove_new_temp_files(paths, before)
            note = checkpoint_note(plan) if plan.every is not None or plan.resume is not None else ""
            raise type(exc)(f"{exc}; {note}" if note else str(exc), exc.exit_code) from None
        except BaseException:
            remove_new_temp_files(paths, before)
            raise
    return _written(config, paths)


def _written(config: RunConfig, paths: dict[str, Path]) -> dict[str, Path]:
    kinds = ["video", "sidecar"] + (["latents"] if config.pipe_configs.save_latents else [])
    return {kind: paths[kind] for kind in kinds if paths[kind].exists()}


def _run_here(config: RunConfig, model: str, paths: dict[str, Path], plan) -> None:
    from .rank import device_name, run_rank

    try:
        run_rank(0, 1, 0, config, model, paths, 1, plan)
    except (KeyboardInterrupt, RunError, UserError):
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user; details with -v
        logger.debug("generation failed", exc_info=True)
        kind, message, code = describe_failure(exc, config, 1, device_name(config, 0))
        raise RunError(message if kind in ("user", "oom") else f"generation failed: {message}", code) from None


def _launch_torchrun(config: RunConfig, overwrite: bool, resume: str | os.PathLike[str] | None,
                     config_path: str | os.PathLike[str] | None) -> dict[str, Path]:
    """This process's rank of a torchrun job (torchrun stops the others when one fails)."""
    from .rank import configure_rank_logging, device_name, run_rank

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    config.pipe_configs.check_world_size(world_size)
    paths, model, plan = prepare(config, overwrite, resume, world_size=world_size, config_path=config_path)
    configure_rank_logging(rank, logging.getLogger().level or logging.INFO)
    logger.info("joining the torchrun job: %d ranks (devices from torchrun, not the config)", world_size)
    try:
        run_rank(rank, world_size, local_rank, config, model, paths, local_world, plan)
    except BaseException as exc:  # noqa: BLE001 - say what happened here, once
        kind, message, code = describe_failure(exc, config, world_size, device_name(config, local_rank))
        logger.debug("rank %d failed", rank, exc_info=True)
        text = message if kind == "user" else f"rank {rank} {message}" if kind == "oom" else f"rank {rank} failed: {message}"
        print(f"video-infinity: error: {text}", file=sys.stderr, flush=True)
        os._exit(code)  # no teardown: the peers may be gone
    return _written(config, paths) if rank == 0 else {}
