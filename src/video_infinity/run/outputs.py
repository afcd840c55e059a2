"""The files a run writes under ``base_path``, and the rule that none replaces a file the user did
not ask to replace: an existing output is kept unless ``--overwrite``, an unfinished run's
checkpoint is kept unless resumed or ``--overwrite``, and the config file being run is never an
output, whatever the flags."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .config import RunConfig

CHECKPOINT_SUFFIX = ".ckpt"
CONTACT_SHEET_SUFFIX = ".png"
"""A grid of the video's frames, written when a front-end's request asks for it."""


def output_paths(config: RunConfig, stem: str | None = None) -> dict[str, Path]:
    """The files a run may write (``stem``: the name without suffix, default from the config)."""
    base = Path(config.base_path)
    name = stem or config.pipe_configs.resolved_file_name()
    return {
        "video": base / f"{name}.mp4",
        "sidecar": base / f"{name}.json",
        "latents": base / f"{name}.latents.npy",
        "checkpoint": base / f"{name}{CHECKPOINT_SUFFIX}",
    }


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(config: RunConfig, paths: dict[str, Path], *, overwrite: bool = False,
                  resume: Path | None = None, config_path: str | os.PathLike[str] | None = None) -> None:
    """Refuse (ConfigError, exit 2) a run that would replace a file it was not asked to replace."""
    if config_path is not None:
        for kind, path in paths.items():
            if _same_file(path, Path(config_path)):
                raise ConfigError(f"pipe_configs.file_name: the run would write its {kind} to {path}, which is the "
                                  "config file being run (choose another file_name or base_path)")
    pipe = config.pipe_configs
    written = ["video", "sidecar"] + (["latents"] if pipe.save_latents else [])
    for kind in written:
        if paths[kind].exists() and not overwrite:
            raise ConfigError(f"pipe_configs.file_name: {paths[kind]} exists (pass --overwrite to replace it, or "
                              "choose another file_name)")
    checkpoint = paths["checkpoint"]
    resuming_it = resume is not None and _same_file(resume, checkpoint)
    if checkpoint.exists() and not resuming_it and not overwrite:
        raise ConfigError(f"pipe_configs.file_name: {checkpoint} holds the checkpoint of an unfinished run "
                          f"(continue it with --resume {checkpoint}, or pass --overwrite to start over)")
