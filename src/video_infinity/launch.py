"""Start the ranks: in this process (one device), one process per device, or join torchrun.

Pre-flight checks run once here, before any process starts: the output folder is writable and has
room for the estimated outputs, the output does not exist yet (unless ``--overwrite``), the model
folder is complete and its files readable, a ``--resume`` checkpoint belongs to this config and model.

While the ranks run, this process watches them. When one raises or dies (even by SIGKILL), the
others are stopped at once (they may be blocked in a collective that would only time out much
later), temporary files are removed, and one line names the rank and its error. Ctrl-C (SIGINT) or
SIGTERM stops every rank the same way and keeps the last checkpoint.

This module imports torch only inside the ranks, so a refused run fails fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from .checkpoint import (
    SUFFIX,
    CheckpointError,
    CheckpointPlan,
    check_compatible,
    estimate_bytes,
    hash_parts,
    load_checkpoint,
    result_parts,
)
from .config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""Seconds a stopped rank gets to exit after SIGTERM before it is killed (SIGKILL)."""

_FORKSERVER_PRELOAD = ("video_infinity.pipeline", "video_infinity.launch")


class RunError(Exception):
    """A run that failed or was refused: a one-line message for the user and the exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.exit_code = exit_code


class RunInterrupted(RunError):
    """Stopped by Ctrl-C (exit code 130) or SIGTERM (143)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM received by the launcher (handled like Ctrl-C)."""


# --------------------------------------------------------------------------------------------------
# Paths, ports, model


def output_paths(config: RunConfig, stem: str | None = None) -> dict[str, Path]:
    """The files a run writes under ``base_path`` (``stem``: the name without suffix, default from the config)."""
    base = Path(config.base_path)
    name = stem or config.pipe_configs.resolved_file_name()
    return {
        "video": base / f"{name}.mp4",
        "sidecar": base / f"{name}.json",
        "latents": base / f"{name}.latents.npy",
        "checkpoint": base / f"{name}{SUFFIX}",
    }


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


# What each component subfolder of a pipeline folder must hold (as models.py checks it at load time).
_COMPONENT_FILES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "unet": [("config.json", ("config.json",)), ("weights", ("diffusion_pytorch_model*",))],
    "vae": [("config.json", ("config.json",)), ("weights", ("diffusion_pytorch_model*",))],
    "text_encoder": [("config.json", ("config.json",)), ("weights", ("model*.safetensors*", "pytorch_model*.bin*"))],
    "tokenizer": [("vocab.json+merges.txt or tokenizer.json", ("tokenizer.json", "merges.txt"))],
    "scheduler": [("scheduler_config.json", ("scheduler_config.json",))],
}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[A-Za-z0-9][\w.\-]*$")


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (truncated, bad header), or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"is truncated ({size} bytes)"
            length = int.from_bytes(raw, "little")
            if length <= 0 or 8 + length > size:
                return f"is truncated or corrupt (header of {length} bytes, file of {size} bytes)"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except ValueError:
        return "has a corrupt header (not JSON)"
    if not isinstance(header, dict):
        return "has a corrupt header"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    needed = 8 + length + (max(ends) if ends else 0)
    if needed > size:
        return f"is truncated ({size} bytes, its header needs {needed})"
    return None


def _check_files(folder: Path, label: str, field: str) -> None:
    """Every JSON file parses and every safetensors file is complete (configs and weights of ``folder``)."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else f"invalid JSON: {str(exc).splitlines()[0]}"
                raise ConfigError(f"{field}: '{label}' has a broken {rel.as_posix()} ({reason})") from None
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                raise ConfigError(f"{field}: '{label}': {rel.as_posix()} {problem} (download or copy the model again)")


def check_model_folder(model: str, base_model: str | None) -> None:
    """Refuse a local model folder that cannot load, before any rank starts (a hub id is left to the ranks).

    Checks the layout (a pipeline folder, or a UNet-only folder with ``base_model``), that each
    component has its config and weights, that every JSON file parses and every safetensors file is
    complete. Wrong weight shapes are only found when the ranks load the model.
    """
    path = Path(model).expanduser()
    if not path.exists():
        if _HUB_ID.match(model) is None or model.startswith((".", "~")):
            raise ConfigError(f"model: folder '{model}' does not exist")
        return  # a hub id: the ranks look it up (offline: in the Hugging Face cache)
    if not path.is_dir():
        raise ConfigError(f"model: '{model}' is a file; expected a diffusers model folder or a hub id")
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        missing = []
        for component, needs in _COMPONENT_FILES.items():
            sub = path / component
            if not sub.is_dir():
                missing.append(f"{component}/")
                continue
            missing += [f"{component}/{what}" for what, globs in needs if not any(any(sub.glob(g)) for g in globs)]
        if missing:
            raise ConfigError(f"model: folder '{model}' is incomplete: missing {', '.join(missing)}")
        _check_files(path, model, "model")
        return
    if (path / "config.json").is_file():
        _check_files(path, model, "model")
        if base_model is None:
            raise ConfigError(f"base_model: model '{model}' holds only a UNet; set base_model to a diffusers "
                              "pipeline that provides vae, text_encoder, tokenizer and scheduler")
        check_model_folder(base_model, None)
        return
    raise ConfigError(f"model: '{model}' is not a diffusers model folder: it has neither model_index.json (pipeline "
                      "with unet/ vae/ text_encoder/ tokenizer/ scheduler/) nor a UNet config.json")


# --------------------------------------------------------------------------------------------------
# Disk space


def _model_config(model: str, sub: str) -> dict[str, Any]:
    for candidate in (Path(model) / sub / "config.json", Path(model) / "config.json"):
        try:
            return dict(json.loads(candidate.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
    return {}


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def estimate_output_bytes(config: RunConfig, model: str) -> dict[str, int]:
    """Rough disk needs of a run: the MP4, the latents file, the checkpoint (with its temporary copy)."""
    pipe = config.pipe_configs
    frames = config.total_frames
    channels = int(_model_config(model, "unet").get("in_channels", 4))
    scale = 2 ** (len(_model_config(model, "vae").get("block_out_channels", [0, 0, 0, 0])) - 1)
    element = 4 if config.uses_cpu or config.dtype == "float32" else 2
    latent_values = channels * frames * (pipe.height // scale) * (pipe.width // scale)
    needs = {"video": frames * pipe.height * pipe.width * 3 // 8}  # H.264 at crf 18; noise-like frames compress poorly
    if pipe.save_latents:
        needs["latents"] = latent_values * 4
    if pipe.checkpoint_every is not None:
        needs["checkpoint"] = estimate_bytes(latent_values * element, pipe.scheduler)
    return needs


def check_disk_space(config: RunConfig, model: str) -> None:
    """Refuse a run whose estimated outputs do not fit in ``base_path``'s free space."""
    base = Path(config.base_path)
    needs = estimate_output_bytes(config, model)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    total = sum(needs.values())
    if total > free:
        parts = ", ".join(f"{name} ~{_human(size)}" for name, size in needs.items())
        raise ConfigError(f"base_path: not enough disk space in {base}: the run needs about {_human(total)} ({parts}) "
                          f"but {_human(free)} is free (free some space, choose another base_path, or make the video "
                          "shorter or smaller)")


# --------------------------------------------------------------------------------------------------
# Pre-flight


def _check_base_path(config: RunConfig) -> Path:
    base = Path(config.base_path)
    if base.exists() and not base.is_dir():
        raise ConfigError(f"base_path: {base} exists and is not a folder")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"base_path: cannot create {base}: {exc.strerror or exc}") from None
    try:  # os.access says yes to root and on read-only mounts: try for real
        with tempfile.TemporaryFile(dir=base, prefix=".video-infinity-write-test."):
            pass
    except OSError as exc:
        raise ConfigError(f"base_path: {base} is not writable ({exc.strerror or exc}; choose another folder)") from None
    return base


def _effective_dtype(config: RunConfig) -> str:
    return "float32" if config.uses_cpu else config.dtype


def prepare(config: RunConfig, overwrite: bool = False, resume: str | os.PathLike[str] | None = None,
            world_size: int | None = None) -> tuple[dict[str, Path], str, CheckpointPlan]:
    """All checks before a run: ``(output paths, model, checkpoint plan)``; ConfigError/CheckpointError if refused."""
    world_size = world_size or config.world_size
    _check_base_path(config)
    model = resolve_model(config)
    check_model_folder(model, config.base_model)
    pipe = config.pipe_configs
    data: dict[str, Any] | None = None
    resume_path = Path(resume) if resume is not None else None
    if resume_path is not None:
        data = load_checkpoint(resume_path)
    stem = None if pipe.file_name is not None or data is None else str(data.get("file_stem") or "") or None
    paths = output_paths(config, stem)
    if paths["video"].exists() and not overwrite:
        raise ConfigError(f"pipe_configs.file_name: {paths['video']} exists (pass --overwrite or choose another file_name)")
    if paths["checkpoint"].exists() and resume_path is None and not overwrite:
        raise ConfigError(f"pipe_configs.file_name: {paths['checkpoint']} holds the checkpoint of an unfinished run "
                          f"(continue it with --resume {paths['checkpoint']}, or pass --overwrite to start over)")
    check_disk_space(config, model)
    plan = CheckpointPlan(path=paths["checkpoint"], every=pipe.checkpoint_every)
    if pipe.checkpoint_every is not None or data is not None:
        parts = result_parts(config, model, world_size, _effective_dtype(config))
        plan = CheckpointPlan(path=paths["checkpoint"], every=pipe.checkpoint_every, parts=parts, config_hash=hash_parts(parts))
    if data is not None and resume_path is not None:
        check_compatible(data, resume_path, plan)
        step = int(data["step"])
        plan = CheckpointPlan(path=plan.path, every=plan.every, parts=plan.parts, config_hash=plan.config_hash,
                              resume=resume_path, resume_step=step)
        logger.info("resuming %s at step %d of %d (saved by %s rank(s))", resume_path, step, pipe.steps,
                    data.get("world_size"))
    return paths, model, plan


# --------------------------------------------------------------------------------------------------
# Rank failures


_COMM_ERRORS = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket timeout",
                "timed out", "gloo", "nccl", "connection refused", "read error", "write error")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _is_comm_error(exc: BaseException) -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(pattern in text for pattern in _COMM_ERRORS)


def oom_message(config: RunConfig, world_size: int, device: str) -> str:
    """What to lower after an out-of-memory error, with the current values."""
    pipe = config.pipe_configs
    frames = pipe.total_frames_for(world_size)
    per_device = -(-frames // world_size)
    kind = "GPU memory" if device.startswith("cuda") else "memory"
    return (f"ran out of {kind} on {device}: lower the frames per device (now up to {per_device}: "
            f"pipe_configs.num_frames, or total_frames spread over more devices), the resolution "
            f"(pipe_configs.height x width, now {pipe.height}x{pipe.width}) or the dtype (dtype, now {config.dtype}; "
            "float16 or bfloat16 halve it)")


def describe_failure(exc: BaseException, config: RunConfig, world_size: int, device: str = "cpu") -> tuple[str, str, int]:
    """``(kind, one-line message, exit code)`` of a rank's exception.

    kind: ``user`` (config, model, checkpoint: exit 2), ``oom``, ``peer`` (lost contact with another
    rank: usually not the cause), ``interrupted`` or ``error``.
    """
    if isinstance(exc, (ConfigError, CheckpointError)) or type(exc).__name__ == "ModelLoadError":
        return "user", str(exc).replace("\n", " "), 2
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted", 130
    if _is_oom(exc):
        return "oom", oom_message(config, world_size, device), 1
    if _is_comm_error(exc):
        return "peer", f"lost contact with the other ranks ({_first_line(exc)})", 1
    return "error", _first_line(exc), 1


# --------------------------------------------------------------------------------------------------
# Ranks


def _in_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _setup_logging(rank: int) -> None:
    level = logging.getLogger().level or logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)


def _device_name(config: RunConfig, local_rank: int) -> str:
    if config.uses_cpu:
        return "cpu"
    gpu = config.devices[local_rank] if len(config.devices) > local_rank else local_rank
    return f"cuda:{gpu}"


def _run_rank(rank: int, world_size: int, local_rank: int, config: RunConfig, model: str,
              paths: dict[str, Path], local_world: int, plan: CheckpointPlan | None = None) -> None:
    import torch
    import torch.distributed as dist

    from .context import ClipContext
    from .pipeline import generate_on_rank

    device = torch.device(_device_name(config, local_rank))
    if device.type == "cpu":
        if config.plugin_configs.split_invariant_on("cpu"):
            # BLAS/oneDNN results depend on the thread count: the same count on every world size
            # keeps the video bit-identical whatever the number of ranks.
            torch.set_num_threads(1)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=config.collective_timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    ctx = ClipContext.from_process_group(config.pipe_configs.total_frames_for(world_size))
    generate_on_rank(config, model, ctx, device, paths, plan)
    if dist.is_initialized():  # on success only: after a failure the peers may never answer
        dist.destroy_process_group()


def _exit_with_launcher(launcher: int) -> None:
    """Kill this rank as soon as the launcher process is gone (e.g. killed with -9).

    The ranks are children of the fork server, which itself lives as long as any rank does, so
    neither a parent-death signal nor the fork server would stop them: a thread watches the
    launcher (a pidfd on Linux, else polling).
    """
    import select
    import threading

    try:
        pidfd: int | None = os.pidfd_open(launcher)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the launcher has exited
        else:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(launcher, 0)
                except ProcessLookupError:
                    break
                except OSError:
                    continue
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _spawned_rank(rank: int, world_size: int, port: int, config: RunConfig, model: str, paths: dict[str, Path],
                  plan: CheckpointPlan, log_level: int, report_dir: str, launcher: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the launcher stops us
    _exit_with_launcher(launcher)
    import threading

    import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which a rank that ends with os._exit would
    # leak (and the resource tracker would complain about); the ranks need only a thread lock.
    tqdm.tqdm.set_lock(threading.RLock())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    logging.getLogger().setLevel(log_level)
    _setup_logging(rank)
    try:
        _run_rank(rank, world_size, rank, config, model, paths, world_size, plan)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which stops everyone
        kind, message, code = describe_failure(exc, config, world_size, _device_name(config, rank))
        try:
            _write_json(Path(report_dir) / f"rank{rank}.json", {"kind": kind, "message": message, "code": code,
                                                                 "time": time.time()})
        finally:
            logger.debug("rank %d failed", rank, exc_info=True)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # no interpreter teardown: it could wait on peers that will never answer


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _root_cause(procs: list[Any], stopped: set[int], report_dir: Path) -> tuple[str, int]:
    """The one-line message and exit code of the failure that brought the run down."""
    reports: dict[int, dict[str, Any]] = {}
    for rank in range(len(procs)):
        try:
            reports[rank] = json.loads((report_dir / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            continue
    candidates: list[tuple[int, float, str, int]] = []
    for rank, proc in enumerate(procs):
        report = reports.get(rank)
        code = proc.exitcode
        if report is not None and report.get("kind") != "peer":
            kind, message = report["kind"], report["message"]
            if kind == "user":
                text = message
            elif kind == "oom":
                text = f"rank {rank} {message}"
            else:
                text = f"rank {rank} failed: {message}"
            candidates.append((0, report.get("time", 0.0), text, int(report.get("code", 1))))
        elif code is not None and code < 0 and rank not in stopped:
            candidates.append((1, 0.0, f"rank {rank} was killed ({_signal_name(code)})", 1))
        elif report is not None:
            candidates.append((2, report.get("time", 0.0), f"rank {rank} failed: {report['message']}", 1))
        elif code not in (None, 0) and rank not in stopped:
            candidates.append((3, 0.0, f"rank {rank} exited with code {code}", 1))
    if not candidates:
        return "a rank failed without a report", 1
    _, _, text, code = min(candidates, key=lambda c: (c[0], c[1]))
    return text, code


def _stop(procs: list[Any]) -> set[int]:
    """Stop every rank still running (SIGTERM, then SIGKILL after STOP_GRACE_S); the ranks it stopped."""
    stopped = set()
    for rank, proc in enumerate(procs):
        if proc.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGTERM)
            stopped.add(rank)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
    return stopped


def _stop_forkserver() -> None:
    """End the fork server now: left alone, it lingers after this process exits (its interpreter
    teardown, with torch and diffusers loaded, takes about a second)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        if server._forkserver_pid is not None:
            os.kill(server._forkserver_pid, signal.SIGKILL)  # it holds nothing worth a clean exit
        server._stop()


def _watch(procs: list[Any]) -> bool:
    """Wait until every rank has exited (True) or one has failed (False)."""
    from multiprocessing.connection import wait

    running = set(range(len(procs)))
    while running:
        wait([procs[rank].sentinel for rank in running], timeout=1.0)
        failed = False
        for rank in sorted(running):
            code = procs[rank].exitcode
            if code is not None:
                running.discard(rank)
                failed = failed or code != 0
        if failed:
            return False
    return True


def _run_spawned(config: RunConfig, model: str, paths: dict[str, Path], plan: CheckpointPlan) -> None:
    import multiprocessing

    world_size = config.world_size
    # forkserver: the heavy imports happen once, in the server, instead of once per rank (spawn);
    # unlike fork, no rank inherits this process's threads or CUDA state.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
    port = pick_port(config.master_port)
    report_dir = Path(tempfile.mkdtemp(prefix="video-infinity-ranks-"))
    procs: list[Any] = []
    ok = False
    try:
        for rank in range(world_size):
            proc = context.Process(
                target=_spawned_rank, name=f"video-infinity-rank{rank}",
                args=(rank, world_size, port, config, model, paths, plan, logging.getLogger().level or logging.INFO,
                      str(report_dir), os.getpid()),
            )
            proc.start()
            procs.append(proc)
        ok = _watch(procs)
    finally:
        with _signals_deferred():
            started = time.monotonic()
            stopped = _stop(procs)
            message, code = ("", 0) if ok else _root_cause(procs, stopped, report_dir)
            shutil.rmtree(report_dir, ignore_errors=True)
            stopped_at = time.monotonic()
            _stop_forkserver()
            logger.debug("ranks stopped in %.2f s, fork server in %.2f s", stopped_at - started,
                         time.monotonic() - stopped_at)
    if not ok:
        raise RunError(message, code)


# --------------------------------------------------------------------------------------------------
# Signals and temporary files


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up (a second Ctrl-C must not leave ranks or files behind)."""
    if not _main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _temp_files(paths: dict[str, Path]) -> set[Path]:
    """Temporary files beside the outputs (``.<output name>.*``: partial MP4s, JSON, latents, checkpoints)."""
    found: set[Path] = set()
    for path in paths.values():
        if path.parent.is_dir():
            found.update(path.parent.glob(f".{path.name}.*"))
    return found


def _remove_new_temp_files(paths: dict[str, Path], before: set[Path]) -> None:
    for path in _temp_files(paths) - before:
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _checkpoint_note(plan: CheckpointPlan) -> str:
    if plan.path.is_file():
        return f"the last checkpoint is kept: continue with --resume {plan.path}"
    if plan.resume is not None:
        return f"the checkpoint it resumed from is kept: continue with --resume {plan.resume}"
    if plan.every is None:
        return "no checkpoint (set pipe_configs.checkpoint_every to keep the progress of long runs)"
    return "no checkpoint was saved yet"


# --------------------------------------------------------------------------------------------------
# Entry point


def launch(config: RunConfig, overwrite: bool = False, resume: str | os.PathLike[str] | None = None) -> int:
    """Run the whole generation; returns 0, or raises RunError / ConfigError / CheckpointError (one line each)."""
    with _sigterm_as_interrupt():
        if _in_torchrun():
            return _launch_torchrun(config, overwrite, resume)
        paths, model, plan = prepare(config, overwrite, resume)
        world_size = config.world_size
        logger.info("%d rank(s) on %s, %d frames", world_size, "CPU" if config.uses_cpu else f"GPUs {config.devices}",
                    config.total_frames)
        before = _temp_files(paths)
        try:
            if world_size == 1:
                try:
                    _run_rank(0, 1, 0, config, model, paths, 1, plan)
                except (KeyboardInterrupt, RunError, ConfigError, CheckpointError):
                    raise
                except Exception as exc:  # noqa: BLE001 - one line for the user; details with -v
                    logger.debug("generation failed", exc_info=True)
                    kind, message, code = describe_failure(exc, config, 1, _device_name(config, 0))
                    raise RunError(message if kind == "user" else (
                        message if kind == "oom" else f"generation failed: {message}"), code) from None
            else:
                _run_spawned(config, model, paths, plan)
        except KeyboardInterrupt as exc:
            with _signals_deferred():
                _remove_new_temp_files(paths, before)
                what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
                stopped = f"all {world_size} ranks stopped" if world_size > 1 else "stopped"
                raise RunInterrupted(f"{what}: {stopped}; {_checkpoint_note(plan)}",
                                     143 if isinstance(exc, _Terminated) else 130) from None
        except RunError as exc:
            _remove_new_temp_files(paths, before)
            note = _checkpoint_note(plan) if plan.every is not None or plan.resume is not None else ""
            raise RunError(f"{exc}; {note}" if note else str(exc), exc.exit_code) from None
        except BaseException:
            _remove_new_temp_files(paths, before)
            raise
    return 0


def _launch_torchrun(config: RunConfig, overwrite: bool, resume: str | os.PathLike[str] | None) -> int:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    config.pipe_configs.check_world_size(world_size)
    paths, model, plan = prepare(config, overwrite, resume, world_size=world_size)
    _setup_logging(rank)
    logger.info("joining the torchrun job: %d ranks (devices from torchrun, not the config)", world_size)
    try:
        _run_rank(rank, world_size, local_rank, config, model, paths, local_world, plan)
    except BaseException as exc:  # noqa: BLE001 - torchrun stops the others; say what happened here, once
        kind, message, code = describe_failure(exc, config, world_size, _device_name(config, local_rank))
        logger.debug("rank %d failed", rank, exc_info=True)
        text = message if kind == "user" else f"rank {rank} {message}" if kind == "oom" else f"rank {rank} failed: {message}"
        print(f"video-infinity: error: {text}", file=sys.stderr, flush=True)
        os._exit(code)  # no teardown: the peers may be gone
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `video-infinity generate --config FILE`")
