"""Running ``video-infinity generate``: pre-flight checks, then the ranks (in this process for one
device, one supervised process per device, or this process's part of a torchrun job).

Modules: ``config`` (the run config), ``outputs`` (what a run writes, and what it may not replace),
``preflight`` (checks before any rank starts), ``checkpoint`` (save / resume), ``supervise``
(process supervision, signals, temporary files), ``progress`` (each rank's live progress, for
front-ends), ``contract`` (the messages a front-end and a run exchange: request, progress,
result, error), ``failures`` (what a rank's exception means for the user), ``rank`` (one rank's
work, on :class:`~video_infinity.pipeline.VideoInfinityPipeline`).
Importing this package does not import torch: a refused run fails fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from ..errors import RunError, RunInterrupted, UserError
from .config import RunConfig
from .contract import ErrorReport, RunChannel, RunRequest, RunResult, StatusFolder
from .failures import describe_failure
from .outputs import CONTACT_SHEET_SUFFIX
from .preflight import prepare
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


__all__ = ["launch", "run_request"]


def _in_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def launch(config: RunConfig, overwrite: bool = False, resume: str | os.PathLike[str] | None = None,
           config_path: str | os.PathLike[str] | None = None, channel: RunChannel | None = None) -> dict[str, Path]:
    """Run the whole generation; returns the paths of the files written (on rank 0; {} on the other
    torchrun ranks). Raises a one-line :class:`UserError` (refused: exit 2), :class:`RunError` (a rank
    failed) or :class:`RunInterrupted`. ``config_path``: the config file being run, never an output.
    ``channel``: where the ranks report their progress (see :func:`run_request`)."""
    channel = channel or RunChannel()
    with sigterm_as_interrupt():
        if _in_torchrun():
            return _launch_torchrun(config, overwrite, resume, config_path, channel)
        paths, model, plan = prepare(config, overwrite, resume, config_path=config_path)
        world_size = config.world_size
        logger.info("%d rank(s) on %s, %d frames", world_size, "CPU" if config.uses_cpu else f"GPUs {config.devices}",
                    config.total_frames)
        before = temp_files(paths)
        try:
            if world_size == 1:
                _run_here(config, model, paths, plan, channel)
            else:
                run_spawned(config, model, paths, plan, channel)
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
            raise type(exc)(f"{exc}; {note}" if note else str(exc), exc.exit_code, exc.rank) from None
        except BaseException:
            remove_new_temp_files(paths, before)
            raise
    return _written(config, paths)


def _written(config: RunConfig, paths: dict[str, Path]) -> dict[str, Path]:
    kinds = ["video", "sidecar"] + (["latents"] if config.pipe_configs.save_latents else [])
    return {kind: paths[kind] for kind in kinds if paths[kind].exists()}


def _run_here(config: RunConfig, model: str, paths: dict[str, Path], plan, channel: RunChannel) -> None:
    from .rank import device_name, run_rank

    try:
        run_rank(0, 1, 0, config, model, paths, 1, plan, channel)
    except UserError as exc:  # the rank refused its model or checkpoint: say that it was rank 0
        exc.rank = 0
        raise
    except (KeyboardInterrupt, RunError):
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user; details with -v
        logger.debug("generation failed", exc_info=True)
        kind, message, code = describe_failure(exc, config, 1, device_name(config, 0))
        text = message if kind in ("user", "oom") else f"generation failed: {message}"
        raise RunError(text, code, rank=0) from None


def _launch_torchrun(config: RunConfig, overwrite: bool, resume: str | os.PathLike[str] | None,
                     config_path: str | os.PathLike[str] | None, channel: RunChannel) -> dict[str, Path]:
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
        run_rank(rank, world_size, local_rank, config, model, paths, local_world, plan, channel)
    except BaseException as exc:  # noqa: BLE001 - say what happened here, once
        kind, message, code = describe_failure(exc, config, world_size, device_name(config, local_rank))
        logger.debug("rank %d failed", rank, exc_info=True)
        text = message if kind == "user" else f"rank {rank} {message}" if kind == "oom" else f"rank {rank} failed: {message}"
        if channel.folder is not None:  # each rank is its own launcher here: it reports its own failure
            error = RunInterrupted(text, code) if kind == "interrupted" else RunError(text, code, rank)
            channel.folder.write_error(ErrorReport.from_exception(error, rank))
        print(f"video-infinity: error: {text}", file=sys.stderr, flush=True)
        os._exit(code)  # no teardown: the peers may be gone
    return _written(config, paths) if rank == 0 else {}


def run_request(request: RunRequest, folder: StatusFolder | None = None) -> dict[str, Path]:
    """Run ``request`` as :func:`launch` does, reporting to ``folder`` (when given): each rank's
    progress, then exactly one of :class:`RunResult` (the files written, the seed, the seconds per
    stage, the peak memory) and :class:`ErrorReport` (the one line raised, which rank, what kind),
    before the exception propagates. Returns the paths of the files written."""
    channel = RunChannel(folder, request.step_sleep_s)
    try:
        written = launch(request.config, overwrite=request.overwrite, resume=request.resume,
                         config_path=request.config_path, channel=channel)
    except BaseException as exc:
        if folder is not None:
            folder.write_error(ErrorReport.from_exception(exc))
        raise
    sheet = _contact_sheet(written, request.overwrite) if request.contact_sheet and "video" in written else None
    if sheet is not None:
        written = {**written, "contact_sheet": sheet}
    if folder is not None and "sidecar" in written:  # rank 0 (a torchrun job's other ranks wrote nothing)
        sidecar = json.loads(written["sidecar"].read_text(encoding="utf-8"))
        folder.write_result(RunResult.from_sidecar(written, sidecar, sheet))
    return written


def _contact_sheet(written: dict[str, Path], overwrite: bool) -> Path | None:
    """``<name>.png`` beside the video: up to 32 evenly spaced frames (an existing file is replaced
    only with ``overwrite``)."""
    from ..video_io import contact_sheet, read_video, write_png  # numpy and PyAV

    path = written["video"].with_suffix(CONTACT_SHEET_SUFFIX)
    if path.exists() and not overwrite:
        logger.warning("%s exists: no contact sheet written (pass --overwrite to replace it)", path)
        return None
    try:
        write_png(path, contact_sheet(read_video(written["video"])[0], columns=8, max_frames=32))
    except (OSError, ValueError) as exc:  # the video is written: a missing picture does not fail the run
        logger.warning("%s: no contact sheet (%s)", written["video"], exc)
        return None
    return path
