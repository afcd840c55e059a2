"""What a failed rank's exception means for the user: its kind, a one-line message, an exit code.

Classified by type and by where it was raised, never by message text: the package's own errors
(:class:`UserError`: exit 2), out-of-memory errors (``torch.OutOfMemoryError``, ``MemoryError``:
the message names the knobs to lower), errors raised inside ``torch.distributed`` (a peer was lost:
usually an echo of another rank's failure), Ctrl-C, anything else.
"""

from __future__ import annotations

import os
import sys
import traceback

from ..errors import UserError, describe_exception
from .config import RunConfig

def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError))


def _raised_in_collective(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside ``torch.distributed`` (gloo reports a lost peer as a plain
    RuntimeError from there) or is one of its DistError types."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    package = os.path.dirname(dist.__file__) + os.sep
    return any(frame.filename.startswith(package) for frame in traceback.extract_tb(exc.__traceback__))


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
    if isinstance(exc, UserError):
        return "user", str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted", 130
    if _is_oom(exc):
        return "oom", oom_message(config, world_size, device), 1
    if _raised_in_collective(exc):
        return "peer", f"lost contact with the other ranks ({describe_exception(exc)})", 1
    return "error", describe_exception(exc), 1

