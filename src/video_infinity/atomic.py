"""Atomic file writes: every output is written to a temporary file beside its destination
(``.<name>.<random>.part``, same folder so the rename is atomic), flushed to disk and renamed into
place, so a crash or a kill never leaves a half-written file under the final name.
The one owner of that pattern in the package."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PART_SUFFIX = ".part"
"""Suffix of every temporary file the package writes beside an output."""


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A new empty temporary file beside ``path`` (``.<name>.<random>.part``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes it owner-only; the final file should be an ordinary one
    return Path(name)


def is_temp_of(candidate: Path, path: Path) -> bool:
    """Whether ``candidate`` is one of the temporary files of output ``path``."""
    return (candidate.parent == path.parent and candidate.name.startswith(f".{path.name}.")
            and candidate.name.endswith(PART_SUFFIX))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` (then flush the folder entry)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_output(p) as tmp: write tmp`` -- ``p`` appears complete on success; on an
    exception the temporary file is removed and ``p`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], payload: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(payload)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))
