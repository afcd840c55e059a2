"""Shared helpers for engine tests: a tiny random UNet3D saved to disk, and real multi-process runs."""

from __future__ import annotations

import math
import os
import socket
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import UNet3DConditionModel


def build_tiny_unet(path: Path, seed: int = 0) -> Path:
    """Random tiny UNet3DConditionModel saved with save_pretrained. Every weight is random (the
    zero-initialised last temporal conv included), so every temporal path changes the output."""
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=8,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    unet.save_pretrained(path)
    return path


def load_unet(path: Path) -> UNet3DConditionModel:
    return UNet3DConditionModel.from_pretrained(path).eval()


# Environments in which kernels pick other algorithms by shape: a frame's bits must still not depend
# on which other frames its rank holds. name -> (environment of the rank processes, torch threads per rank).
BLAS_ENVIRONMENTS: dict[str, tuple[dict[str, str], int]] = {
    "mkl_cbwr_compatible": ({"MKL_CBWR": "COMPATIBLE"}, 1),
    "mkl_avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1),
    "two_threads_per_rank": ({}, 2),  # torch.set_num_threads sets OpenMP's and MKL's thread counts
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads: a reference computed in the test process must use
    the thread count of the ranks it is compared with (small products round by thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Imported once by the test session's fork server, so that a rank starts in a fraction of a second
# instead of importing torch and diffusers anew (what the launcher does for the same reason).
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "diffusers", "video_infinity.pipeline", "engine_utils"]


def _fork_ranks(world_size: int, *launch: Any) -> None:
    """The ranks of a run with its own environment, forked from a fresh interpreter started with it
    once that has loaded torch and the test's modules: one import per environment, not one per rank."""
    mp.start_processes(_worker, args=(world_size, *launch), nprocs=world_size, start_method="fork")


def run_distributed(fn: Callable, world_size: int, *args: Any, tmp_dir: Path, threads: int = 1,
                    env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real gloo processes with ``threads`` torch
    threads each and ``env`` added to their environment (read by MKL/oneDNN when they start, e.g.
    ``MKL_CBWR``: such runs fork from a freshly spawned interpreter); return each rank's result."""
    out_dir = Path(tmp_dir) / f"world{world_size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})  # spawned processes inherit the environment at start
    launch = (world_size, free_port(), fn, args, str(out_dir), threads)
    try:
        if env:
            # A fresh interpreter: MKL and oneDNN read their environment (MKL_CBWR, ...) when they
            # load, and the fork server has loaded them already.
            launcher = mp.get_context("spawn").Process(target=_fork_ranks, args=launch)
            launcher.start()
            launcher.join()
            if launcher.exitcode != 0:
                raise RuntimeError(f"the ranks' launcher exited with code {launcher.exitcode}")
        else:
            context = mp.get_context("forkserver")
            context.set_forkserver_preload(_FORKSERVER_PRELOAD)  # takes effect when the server first starts
            mp.start_processes(_worker, args=launch, nprocs=world_size, start_method="forkserver")
    except Exception as exc:  # surface the worker's own traceback
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.err")))
        raise AssertionError(f"distributed run failed:\n{errors}") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


class TemporalStack(torch.nn.Module):
    """A UNet-shaped wrapper around one TransformerTemporalModel with sinusoidal frame positions
    (as AnimateDiff-style motion modules have): checks that positions are global frame indices."""

    def __init__(self, channels: int = 8, seed: int = 0) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

        torch.manual_seed(seed)
        self.temporal = TransformerTemporalModel(
            num_attention_heads=2, attention_head_dim=4, in_channels=channels, norm_num_groups=4,
            positional_embeddings="sinusoidal", num_positional_embeddings=64,
        ).eval()
        with torch.no_grad():
            for p in self.temporal.parameters():
                p.copy_(torch.randn_like(p) * 0.3)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None):
        batch, channels, frames, height, width = sample.shape
        flat = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        out = self.temporal(flat, num_frames=frames, return_dict=False)[0]
        return type("Output", (), {"sample": out.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)})


def dense_band_attention(q, k, v, band, gidx, scale, local_bias, global_bias, token_num_scale):
    """Dense reference of dual-scope attention: every frame a key under the (frames x frames) ``band``
    mask, the global frames ``gidx`` appended as keys every query sees; phase biases and
    token_num_scale as the engine applies them."""
    total = q.shape[-2]
    keys = torch.cat([k, k[..., gidx, :]], dim=-2)
    values = torch.cat([v, v[..., gidx, :]], dim=-2)
    allowed = torch.cat([band, torch.ones(total, len(gidx), dtype=torch.bool)], dim=-1)
    bias = torch.cat([torch.full((total, total), local_bias, dtype=q.dtype),
                      torch.full((total, len(gidx)), global_bias, dtype=q.dtype)], dim=-1)
    factor = torch.ones(total, 1, dtype=q.dtype)
    if token_num_scale:
        factor = (torch.log(allowed.sum(-1, keepdim=True).double()) / math.log(16)).to(q.dtype)
    logits = (q @ keys.transpose(-1, -2)) * scale * factor + bias
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ values
