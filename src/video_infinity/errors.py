"""The package's errors: one base class, one-line messages, and the one formatter of exceptions.

Every error meant for a user is a :class:`VideoInfinityError` whose ``str()`` is a single line
(user-controlled text may contain newlines) and whose ``exit_code`` the command line returns:
2 for :class:`UserError` (config, model, checkpoint, outputs: things the user fixes), 1 for a run
that failed, 130/143 for an interrupted one.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with its line breaks escaped, so it prints as one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def describe_exception(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line`` of an exception; when that line ends with ':' the next line follows, and a
    chained cause that says something new is added in parentheses (skipping UnicodeDecodeErrors,
    which libraries hit while sniffing file types)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:  # e.g. "Error(s) in loading state_dict for X:"
        text = f"{text} {lines[1]}"
    cause = exc.__cause__ or exc.__context__
    while isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause).strip() and str(cause).strip().splitlines()[0] not in text:
        text = f"{text} ({str(cause).strip().splitlines()[0]})"
    return f"{type(exc).__name__}: {one_line(text)[:limit]}"


class VideoInfinityError(Exception):
    """Base of the package's errors: a one-line message and the command line's exit code."""

    exit_code: int = 1
    rank: int | None = None
    """The rank where the run failed, when one did (set by the launcher; None: before the ranks)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(one_line(message))
        if exit_code is not None:
            self.exit_code = exit_code


class UserError(VideoInfinityError):
    """Something the user can fix before running again (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid run configuration or output location: ``<field path>: <problem and fix>``."""


class ModelLoadError(UserError):
    """A model that cannot be found or loaded."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (unreadable, other config or model)."""


class RunError(VideoInfinityError):
    """A run that failed: a rank raised, died or lost its peers (exit code 1 unless said otherwise)."""

    def __init__(self, message: str, exit_code: int | None = None, rank: int | None = None) -> None:
        super().__init__(message, exit_code)
        self.rank = rank


class RunInterrupted(RunError):
    """Stopped by Ctrl-C (exit code 130) or SIGTERM (143)."""
