"""The runs under ``base_path``, for the web UI's gallery: finished runs read from their JSON
sidecars, and runs the UI started that did not finish (its saved config, with or without a
checkpoint to resume). Nothing outside ``base_path`` is ever listed or returned: names are plain
file names, and every path is checked to resolve inside the folder (symbolic links included).
Imports neither torch nor gradio.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..run.outputs import CHECKPOINT_SUFFIX, CONTACT_SHEET_SUFFIX

logger = logging.getLogger(__name__)

CONFIG_SUFFIX = ".config.json"
"""The run config the UI writes for each run it starts (``video-infinity generate --config`` runs it too)."""
_MAX_JSON_BYTES = 4 << 20  # a sidecar is a few kB; anything this large is not one


def inside(base: Path, path: Path) -> bool:
    """True when ``path`` (symbolic links resolved) is ``base`` or lies under it."""
    try:
        return path.resolve().is_relative_to(base.resolve())
    except OSError:
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_sidecar(data: dict[str, Any]) -> bool:
    return isinstance(data.get("video"), str) and isinstance(data.get("config"), dict) and "world_size" in data


@dataclass(frozen=True)
class RunRecord:
    """One run under ``base_path``."""

    name: str
    """The output stem (``<name>.mp4``, ``<name>.json``, ...)."""
    status: str
    """``done``, ``unfinished`` (a checkpoint to resume) or ``stopped`` (cancelled or failed before
    its first checkpoint)."""
    modified: float
    config: dict[str, Any] | None
    sidecar: dict[str, Any] | None
    video: Path | None
    contact_sheet: Path | None
    checkpoint: Path | None
    config_path: Path | None

    @property
    def first_prompt(self) -> str:
        prompts = (self.config or {}).get("pipe_configs", {}).get("prompts")
        if isinstance(prompts, dict):
            return str(prompts.get("0") or next(iter(prompts.values()), ""))
        return str(prompts[0]) if isinstance(prompts, list) and prompts else ""

    def facts(self) -> dict[str, Any]:
        """What the sidecar says of the run (empty for a run that did not finish)."""
        car = self.sidecar
        if car is None:
            return {}
        seconds = car.get("seconds") or {}
        peaks = car.get("peak_memory_bytes") or []
        pipe = car["config"].get("pipe_configs", {})
        return {
            "seed": car.get("seed"),
            "ranks": car.get("world_size"),
            "devices": car.get("devices"),
            "frames": car.get("total_frames"),
            "size": f"{pipe.get('width')}x{pipe.get('height')}",
            "steps": pipe.get("steps"),
            "model": car.get("model"),
            "family": car.get("family"),
            "seconds": {k: round(float(v), 2) for k, v in seconds.items() if isinstance(v, (int, float))},
            "frames_per_second": round(float(car.get("frames_per_second") or 0), 3),
            "peak_memory_mib": [round(p / 2**20, 1) for p in peaks],
            "resumed_from": car.get("resumed_from"),
        }

    def row(self) -> list[Any]:
        """The gallery table's row."""
        pipe = (self.config or {}).get("pipe_configs", {})
        devices = (self.config or {}).get("devices") or []
        frames = (self.sidecar or {}).get("total_frames") or pipe.get("total_frames") or (
            (pipe.get("num_frames") or 0) * len(devices))
        seconds = ((self.sidecar or {}).get("seconds") or {}).get("total")
        return [self.name, self.status, datetime.fromtimestamp(self.modified).strftime("%Y-%m-%d %H:%M:%S"), frames,
                f"{pipe.get('width', '?')}x{pipe.get('height', '?')}", len(devices), pipe.get("steps"),
                None if seconds is None else round(float(seconds), 1), self.first_prompt]


GALLERY_COLUMNS = ["run", "status", "modified", "frames", "size", "ranks", "steps", "seconds", "first prompt"]


def _record(base: Path, name: str) -> RunRecord | None:
    video, sidecar_path = base / f"{name}.mp4", base / f"{name}.json"
    config_path, checkpoint = base / f"{name}{CONFIG_SUFFIX}", base / f"{name}{CHECKPOINT_SUFFIX}"
    sheet = base / f"{name}{CONTACT_SHEET_SUFFIX}"

    def present(path: Path) -> Path | None:
        return path if path.is_file() and inside(base, path) else None

    sidecar = _read_json(sidecar_path) if present(sidecar_path) else None
    if sidecar is not None and not _is_sidecar(sidecar):
        sidecar = None
    saved = _read_json(config_path) if present(config_path) else None
    if sidecar is None and saved is None:
        return None
    if sidecar is not None:
        status, config, stamp = "done", sidecar["config"], sidecar_path
    else:
        status = "unfinished" if present(checkpoint) else "stopped"
        config, stamp = saved, config_path
    if present(checkpoint) is not None and present(checkpoint).stat().st_mtime > stamp.stat().st_mtime:
        stamp = checkpoint
    return RunRecord(name=name, status=status, modified=stamp.stat().st_mtime, config=config, sidecar=sidecar,
                     video=present(video), contact_sheet=present(sheet), checkpoint=present(checkpoint),
                     config_path=present(config_path))


def list_runs(base: str | Path) -> list[RunRecord]:
    """Every run under ``base`` (not its subfolders), newest first."""
    base = Path(base)
    if not base.is_dir():
        return []
    names: set[str] = set()
    for path in base.glob("*.json"):
        if path.name.startswith("."):
            continue
        names.add(path.name[: -len(CONFIG_SUFFIX)] if path.name.endswith(CONFIG_SUFFIX) else path.stem)
    records = [record for name in names if (record := _record(base, name)) is not None]
    return sorted(records, key=lambda r: (r.modified, r.name), reverse=True)


def find_run(base: str | Path, name: str) -> RunRecord:
    """The run called ``name`` under ``base``; ValueError when there is none (or the name is not a plain name)."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"run: {name!r} is not a run name")
    record = _record(Path(base), name)
    if record is None:
        raise ValueError(f"run: no run called {name!r} under {base}")
    return record
