"""Working memory of a call, counted tensor by tensor: on any device, the meta device included, so
the memory of a real-size model can be measured without its weights or a GPU.

:func:`peak_bytes` runs a function under a ``TorchDispatchMode`` that adds up the bytes of every
tensor storage created while it lives; the peak is what the call needs beyond what existed before
it (the weights, the inputs). It counts storages, not allocator blocks: the caching allocator's
rounding and fragmentation come on top on a GPU.

On meta tensors torch's fused attention falls back to its math path, which materialises the
attention matrix in float32; a GPU runs a flash or memory-efficient kernel instead. Under
:func:`peak_bytes` with ``flash_attention=True`` the meta device's attention allocates what such a
kernel allocates: its output and a float32 log-sum-exp row per query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "Measurement", "flash_attention_on_meta", "measure", "parameter_bytes", "peak_bytes"]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it while that storage lives."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
        # A view (a weight's transpose, an input's slice) shares its input's storage: nothing new.
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs and storage.nbytes():
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


@contextmanager
def flash_attention_on_meta(flops: list[int] | None = None) -> Iterator[None]:
    """``torch.nn.functional.scaled_dot_product_attention`` on meta tensors allocates what a flash
    kernel allocates (output, float32 log-sum-exp), and adds its FLOPs (two matrix products: 4 x
    queries x keys x head width per batch item and head) to ``flops[0]``; on other devices it is
    torch's own."""
    functional = torch.nn.functional
    sdpa = functional.scaled_dot_product_attention

    def flash_like(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        if query.device.type != "meta":
            return sdpa(query, key, value, *args, **kwargs)
        if flops is not None:
            flops[0] += 2 * query.shape[:-1].numel() * key.shape[-2] * (query.shape[-1] + value.shape[-1])
        query.new_empty(query.shape[:-1], dtype=torch.float32)  # the log-sum-exp, freed with the call
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    functional.scaled_dot_product_attention = flash_like
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = sdpa


def peak_bytes(fn: Callable[[], Any], flash_attention: bool = True) -> int:
    """The most bytes of tensors created by ``fn()`` alive at once (its working memory: the inputs
    and weights made before the call do not count), without autograd. Deterministic, whatever the
    allocator does."""
    with torch.no_grad(), (flash_attention_on_meta() if flash_attention else _nothing()), LiveBytes() as mode:
        fn()
    return mode.peak


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    """The most bytes of tensors created by the call alive at once (see :func:`peak_bytes`)."""
    flops: int
    """Floating-point operations of its matrix products, convolutions and attention (torch's
    ``FlopCounterMode``; attention on meta tensors counted as above)."""


def measure(fn: Callable[[], Any]) -> Measurement:
    """:func:`peak_bytes` and the FLOPs of ``fn()`` in one run (meta tensors: without computing)."""
    from torch.utils.flop_counter import FlopCounterMode

    attention = [0]
    with torch.no_grad(), flash_attention_on_meta(attention), FlopCounterMode(display=False) as counter, \
            LiveBytes() as mode:
        fn()
    return Measurement(mode.peak, counter.get_total_flops() + attention[0])


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared ones once)."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen[StorageWeakRef(tensor.untyped_storage()).cdata] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


@contextmanager
def _nothing() -> Iterator[None]:
    yield
