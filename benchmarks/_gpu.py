"""What the GPU benchmarks share: a model cast as diffusers loads it, and the labels of a result measured
on a copy of the tree (a lent device machine's), whose git history is absent or stale, so that the run's
own git labels say nothing of it."""

from __future__ import annotations

import argparse
from typing import Any


def cast_as_loaded(model: Any, dtype: Any) -> Any:
    """``model``'s parameters in ``dtype`` but diffusers' float32 modules (``_keep_in_fp32_modules``), as
    ``from_pretrained(torch_dtype=dtype)`` loads them (``model.to(dtype)`` would cast those too); ``model``."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return model


def add_commit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--commit", default=None, help="on a copy of the tree whose git history is absent or stale: "
                        "the commit the copy holds (recorded as commit and engine_commit)")


def copy_labels(commit: str | None, gpu: str | None, script: str) -> dict[str, Any] | None:
    """With ``commit``: it as ``commit`` and ``engine_commit``, no uncommitted files (the copy's git status
    is not this tree's), and the ``stale_note`` a GPU result keeps until a GPU re-runs ``script``."""
    if not commit:
        return None
    return {"commit": commit, "engine_commit": commit, "uncommitted_measures": [],
            "stale_note": f"measured on one {gpu} with the code of {commit[:7]}; kept until a GPU re-runs "
                          f"benchmarks/{script}"}


def parse_gpu_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments with ``--smoke`` (the script's check on CPU at a tiny size, writing nothing)
    and ``--commit``; without CUDA and without ``--smoke``, one line and exit status 2."""
    import torch

    parser.add_argument("--smoke", action="store_true", help="check the script on CPU at a tiny size; writes nothing")
    add_commit_argument(parser)
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--smoke checks the script on CPU)")
    return args
