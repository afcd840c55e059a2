"""What a Wan video needs on one GPU: one transformer call's peak memory at real size, computed on
meta tensors (no weights, no GPU), and with a CUDA GPU measured beside it.

The transformers are diffusers' ``WanTransformer3DModel`` in the configurations of Wan2.1-T2V-1.3B
(480x832: 1,560 tokens per latent frame) and Wan2.2-TI2V-5B (704x1280: 880 tokens; called as its
pipelines call it, one timestep per token), built on the meta device, bfloat16 with diffusers'
float32 modules (``_keep_in_fp32_modules``), the ``wan`` preset (padding 8, top_k 4) on one process,
the engine's GPU defaults (fused kernels), batch 1 (one CFG branch), 512 x 4,096 text embeddings.
Each call is counted with :func:`video_infinity.memory.peak_bytes` (tensor storages alive at once;
attention counted as a flash kernel allocates; the allocator's rounding comes on top on a GPU), for
``block_tokens`` at its default (frame-chunked blocks) and null (diffusers' whole-clip blocks), at
81, 321 and 1,025 frames (21, 81, 257 latent frames).

"Fits" adds the bf16 weights to the call's peak: the denoising step only. Not counted: the text
encoder (UMT5-XXL, ~11 GB bf16: encode first, then off the GPU), the VAE decode, the CUDA context
and allocator slack. N GPUs: each rank's call is extrapolated from the one-process figures (the
per-latent-frame slope times its ceil(frames / N) latent frames plus a halo of 2 x padding frames
of keys and values (at most the clip), plus the constant), labelled "extrapolated"; nothing here
ran on N GPUs. One GPU: the call's own peak plus the weights, "computed on meta tensors".

Host time (issue 24 item 4, Wan2.1-1.3B only): what the engine's Python and torch's dispatcher cost
per call, the part of a GPU run that CUDA's asynchronous launches hide as long as the host stays
ahead of the GPU. Timed on this CPU, one torch thread, median of interleaved rounds, for the
frame-chunked blocks (the default: 21 latent frames per chunk), one latent frame per chunk
(``block_tokens`` 1,560), the whole clip (null) and diffusers without the engine. On meta tensors
torch runs shape functions (many of them Python) where a GPU launches kernels, so their wall time is
many times the host time of the same call on real tensors (``meta_calibration``: the real-size model
on meta vs the proxy below, same operations). The host time reported is therefore the proxy's: the
same model, 30 blocks, with every width cut to a few channels and one token per latent frame, with
the same latent frames, chunks and engine path (fused kernels, ``split_invariant`` off, the GPU
default), on real CPU tensors, where each kernel does next to no arithmetic; the number of torch
operations per call is counted beside it (each at most one kernel launch on a GPU), and a launch
margin of ``LAUNCH_US`` per operation is added as the pessimistic case. GPU time is assumed: the
real-size call's FLOPs (counted on meta tensors) over an assumed sustained throughput
(``ASSUMED_TFLOPS``). Everything here is computed; nothing ran on a GPU.

    python benchmarks/one_gpu.py            # writes results/one_gpu.json
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
from contextlib import nullcontext
from typing import Any, NamedTuple

from _common import WAN_ENGINE, interleaved, machine, mib, setup_logging, write_result
from _gpu import add_commit_argument, cast_as_loaded, copy_labels

logger = logging.getLogger("one_gpu")
MEASURES = WAN_ENGINE

MODELS: dict[str, dict[str, Any]] = {
    "Wan2.1-T2V-1.3B 480x832": dict(
        config=dict(num_attention_heads=12, ffn_dim=8960, in_channels=16, out_channels=16, num_layers=30),
        latent=(60, 104), per_token_timestep=False),
    "Wan2.2-TI2V-5B 704x1280 (one timestep per token)": dict(
        config=dict(num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48, num_layers=30),
        latent=(44, 80), per_token_timestep=True),
}
COMMON = dict(attention_head_dim=128, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FRAMES = (81, 321, 1025)
GPUS_GIB = (24, 48, 80)
WORLDS = (1, 2, 4, 8)

HOST_MODEL = "Wan2.1-T2V-1.3B 480x832"
HOST_FRAMES = {81: 5, 321: 5, 1025: 3}
"""Frame counts of the host-time section and the timed rounds at each (after one untimed round)."""
PER_FRAME_CHUNKS_UP_TO = 321
"""One latent frame per chunk is timed up to this many frames (at 1,025: 257 chunks, ~7 s a call here)."""
PROXY = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=16, freq_dim=16)
"""The host-time proxy's widths (every other setting, the 30 blocks included, as the real model's)."""
PROXY_LATENT = (2, 2)
"""One token per latent frame (patch 2 x 2)."""
META_TIMESTEP = 1000.0
"""The timestep a call on meta tensors is taken to have (the most global frames); the proxy uses it too."""
ASSUMED_TFLOPS = {"150 (a 24 GB card, RTX 4090 class)": 150, "400 (H100 class, sustained)": 400,
                  "800 (H100/H200 SXM near its 989 dense bf16 peak)": 800}
"""Sustained bf16 throughputs assumed for the GPU time; the faster the GPU, the less host time it hides."""
LAUNCH_US = 5.0
"""Microseconds per torch operation added as the pessimistic case: a CUDA launch that this CPU run has not."""


def wan_engine(block_tokens: Any):
    """The ``wan`` preset, ``block_tokens`` over its default unless "default"."""
    from video_infinity.presets import resolve_engine

    engine = resolve_engine("wan")
    return engine if block_tokens == "default" else engine.model_copy(update={"block_tokens": block_tokens})


def call_measure(model, latent: tuple[int, int], latent_frames: int, per_token: bool, block_tokens: Any):
    """One conditional call's peak and FLOPs (the planner's step without guidance), ``block_tokens``
    over the preset's."""
    from video_infinity import ClipContext
    from video_infinity.families.wan.plan import step_measure

    return step_measure(model, wan_engine(block_tokens), ClipContext(total_frames=latent_frames), latent, per_token,
                        guidance=False)


def _count_ops(fn) -> int:
    """Torch operations dispatched by ``fn()`` (each at most one kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.ops


def _host_calls(build, latent: tuple[int, int], latent_frames: int, settings: dict[str, Any]):
    """For each setting (latent frames per chunk; None: the whole clip; "diffusers": no engine), a
    model from ``build()`` with the engine attached and a function making one conditional call on
    it; and the engines' handles (to remove)."""
    import torch

    from video_infinity import ClipContext, parallelize
    from video_infinity.presets import resolve_engine

    calls, handles = {}, []
    for name, frames_per_chunk in settings.items():
        model = build()
        device = next(model.parameters()).device
        latents = torch.zeros(1, model.config.in_channels, latent_frames, *latent, device=device)
        text = torch.zeros(1, 512, model.config.text_dim, device=device, dtype=torch.bfloat16)
        timestep = torch.full((1,), META_TIMESTEP, device=device)
        if frames_per_chunk != "diffusers":
            tokens = (latent[0] // 2) * (latent[1] // 2)
            engine = resolve_engine("wan").model_copy(update={
                "split_invariant": False,  # the GPU default (the meta device's too)
                "block_tokens": None if frames_per_chunk is None else frames_per_chunk * tokens})
            handles.append(parallelize(model, engine, ClipContext(total_frames=latent_frames)))

        def call(model=model, latents=latents, timestep=timestep, text=text) -> None:
            with torch.no_grad():
                model(latents.to(model.dtype), timestep, text, return_dict=False)

        calls[name] = call
    return calls, handles


def host_times(build, latent: tuple[int, int], latent_frames: int, settings: dict[str, Any], rounds: int,
               meta: bool) -> dict[str, dict[str, float]]:
    """Median seconds of one call per setting over interleaved rounds, and torch operations per call."""
    from video_infinity.memory import flash_attention_on_meta

    calls, handles = _host_calls(build, latent, latent_frames, settings)
    try:
        # On meta tensors: attention as a flash kernel is called (one operation), not torch's math path.
        with flash_attention_on_meta() if meta else nullcontext():
            times = interleaved(calls, rounds, warmup=1)
            ops = {name: _count_ops(call) for name, call in calls.items()}
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"host_s": round(statistics.median(times[name]), 4), "ops": ops[name]} for name in calls}


def proxy_transformer():
    """The host-time proxy: Wan2.1-1.3B's configuration with every width cut (:data:`PROXY`), real
    CPU weights in bf16 but diffusers' float32 modules, as :func:`meta_transformer` casts them."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config({**COMMON, **MODELS[HOST_MODEL]["config"], **PROXY})
    return cast_as_loaded(model, torch.bfloat16).eval()


def host_section(flops: dict[int, int]) -> dict[str, Any]:
    """Issue 24 item 4 at Wan2.1-1.3B 480x832: host seconds per call, and the extra host time of the
    frame-chunked blocks over the whole-clip ones against the GPU time assumed from ``flops``."""
    import torch

    from video_infinity.families.wan.blocks import chunk_tokens
    from video_infinity.families.wan.plan import meta_transformer
    from video_infinity.families.wan.vae import latent_frame_count
    from video_infinity.presets import resolve_engine

    torch.set_num_threads(1)
    spec = MODELS[HOST_MODEL]
    real_tokens = spec["latent"][0] // 2 * spec["latent"][1] // 2
    width = COMMON["attention_head_dim"] * spec["config"]["num_attention_heads"]
    default_fpc = max(1, chunk_tokens(resolve_engine("wan").block_tokens, width) // real_tokens)  # as frame_chunks
    chunked = f"frame_chunked ({default_fpc} latent frames per chunk, default)"
    per_frame = "one latent frame per chunk (block_tokens 1560)"
    whole, plain = "whole_clip (block_tokens null)", "diffusers without the engine"

    def build_meta():
        return meta_transformer({**COMMON, **spec["config"]}, torch.bfloat16)

    calibration = host_times(build_meta, spec["latent"], latent_frame_count(FRAMES[0]),
                             {chunked: default_fpc, whole: None, plain: "diffusers"}, rounds=3, meta=True)
    frames_out: dict[str, Any] = {}
    for frames, rounds in HOST_FRAMES.items():
        latent_frames = latent_frame_count(frames)
        settings = {chunked: default_fpc, whole: None, plain: "diffusers"}
        if frames <= PER_FRAME_CHUNKS_UP_TO:
            settings = {chunked: default_fpc, per_frame: 1, whole: None, plain: "diffusers"}
        timed = host_times(proxy_transformer, PROXY_LATENT, latent_frames, settings, rounds, meta=False)
        for name, fpc in settings.items():
            timed[name]["chunks"] = (None if not isinstance(fpc, int)
                                     else math.ceil(latent_frames / fpc))
            timed[name]["host_s_with_launch_margin"] = round(timed[name]["host_s"]
                                                             + LAUNCH_US * 1e-6 * timed[name]["ops"], 4)
        extra = timed[chunked]["host_s"] - timed[whole]["host_s"]
        extra_margin = timed[chunked]["host_s_with_launch_margin"] - timed[whole]["host_s_with_launch_margin"]
        gpu_s = {label: flops[frames] / (tflops * 1e12) for label, tflops in ASSUMED_TFLOPS.items()}
        entry: dict[str, Any] = {
            "latent_frames": latent_frames,
            "tflop_per_call": round(flops[frames] / 1e12, 1),
            "host": timed,
            "chunking_extra_host_s": round(extra, 4),
            "chunking_extra_host_s_with_launch_margin": round(extra_margin, 4),
            "assumed_gpu_s": {label: round(g, 3) for label, g in gpu_s.items()},
            "chunking_extra_over_gpu_time": {label: round(extra / g, 4) for label, g in gpu_s.items()},
            "chunking_extra_with_launch_margin_over_gpu_time": {label: round(extra_margin / g, 4)
                                                                for label, g in gpu_s.items()},
            "chunked_host_over_gpu_time": {label: round(timed[chunked]["host_s"] / g, 4) for label, g in gpu_s.items()},
            "chunked_host_with_launch_margin_over_gpu_time": {
                label: round(timed[chunked]["host_s_with_launch_margin"] / g, 4) for label, g in gpu_s.items()},
        }
        if per_frame in timed:
            chunks = timed[per_frame]["chunks"] - timed[chunked]["chunks"]
            entry["host_ms_per_chunk_and_block"] = round(
                1e3 * (timed[per_frame]["host_s"] - timed[chunked]["host_s"]) / (chunks * spec["config"]["num_layers"]), 3)
        frames_out[str(frames)] = entry
        logger.info("host, %d frames: %s; extra of chunking %.3f s, %.1f%% of the GPU time at 400 TFLOP/s",
                    frames, ", ".join(f"{n} {t['host_s']:.3f} s" for n, t in timed.items()), extra,
                    100 * extra / (flops[frames] / 400e12))
    for name, entry in calibration.items():
        proxy = frames_out[str(FRAMES[0])]["host"][name]
        entry["proxy_host_s"], entry["proxy_ops"] = proxy["host_s"], proxy["ops"]
        entry["meta_over_proxy"] = round(entry["host_s"] / proxy["host_s"], 1)
    return {
        "what": "issue 24 item 4: host (Python + dispatcher) seconds of one conditional Wan2.1-1.3B 480x832 call, "
                "and the extra host time of frame-chunked blocks over whole-clip blocks as a fraction of the "
                "GPU time assumed from the call's FLOPs",
        "how": "computed (host time measured on CPU with a width-cut proxy of the same code path; "
               "GPU time assumed from FLOPs); nothing ran on a GPU",
        "proxy": {"config": PROXY, "latent": list(PROXY_LATENT), "tokens_per_latent_frame": 1,
                  "num_layers": spec["config"]["num_layers"], "device": "cpu", "torch_threads": 1,
                  "engine": "wan preset, split_invariant false (the GPU default), timestep 1000"},
        "assumed_tflops": {label: t for label, t in ASSUMED_TFLOPS.items()},
        "launch_margin_us_per_op": LAUNCH_US,
        "flops_counted_as": "matrix products and attention of the real-size call on meta tensors "
                            "(frame-chunked; torch FlopCounterMode, attention as a flash kernel)",
        "meta_calibration": {"frames": FRAMES[0], "note": "the real-size call on meta tensors: wall time "
                             "of shape functions, not of a GPU's host path", "settings": calibration},
        "frames": frames_out,
    }


GPU_FRAMES = {"Wan2.1-T2V-1.3B 480x832": (81, 321, 1025), "Wan2.2-TI2V-5B 704x1280 (one timestep per token)": (81, 321, 1025)}
"""Frame counts measured with ``--gpu`` (each: planned, then measured frame-chunked and whole-clip)."""
SMOKE = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=16, num_layers=2)
"""``--smoke``: every width cut, to check the GPU section on CPU (not a measurement)."""


class Measured(NamedTuple):
    peak_bytes: int
    flops: int


def real_transformer(config: dict[str, Any], device: str, dtype: Any):
    """``WanTransformer3DModel(config)`` with random weights on ``device``, ``dtype`` but for diffusers'
    float32 modules, as ``from_pretrained(torch_dtype=dtype)`` loads it (and :func:`meta_transformer` builds it)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel.from_config(config)
    return cast_as_loaded(model, dtype).eval().requires_grad_(False)


def measured_call(model, latent: tuple[int, int], latent_frames: int, per_token: bool, block_tokens: Any,
                  device: str, repeats: int) -> dict[str, Any]:
    """The call :func:`call_measure` plans, run for real: its peak above what was allocated before it
    (``max_memory_allocated``; ``max_memory_reserved`` beside it: the allocator's caching on top) and
    its seconds (one untimed call first, then the median of ``repeats``)."""
    import time

    import torch

    from video_infinity import ClipContext, parallelize

    engine = wan_engine(block_tokens)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, model.config.in_channels, latent_frames, *latent, device=device, generator=generator)
    text = torch.randn(1, 512, model.config.text_dim, device=device, generator=generator).to(model.dtype)
    tokens = latent_frames * (latent[0] // 2) * (latent[1] // 2)
    timestep = torch.full((1, tokens) if per_token else (1,), 500.0, device=device)
    cuda = device == "cuda"

    def call() -> None:
        with torch.no_grad():
            model(latents.to(model.dtype), timestep, text, return_dict=False)
        if cuda:
            torch.cuda.synchronize()

    handle = parallelize(model, engine, ClipContext(total_frames=latent_frames))
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        call()  # the first call: its peak is the one that counts (nothing cached from an earlier call)
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
        reserved = torch.cuda.max_memory_reserved() - base_reserved if cuda else None
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    finally:
        handle.remove()
    return {"peak_bytes": peak, "reserved_bytes": reserved, "seconds": [round(s, 4) for s in seconds],
            "seconds_median": round(statistics.median(seconds), 4) if seconds else None}


BLOCKS = (("frame_chunked", "default"), ("whole_clip", None))


def _gpu_case(name: str, smoke: bool) -> tuple[dict[str, Any], tuple[int, int], tuple[int, ...]]:
    """A ``--gpu`` model's configuration, latent size and frame counts."""
    spec = MODELS[name]
    return ({**COMMON, **spec["config"], **(SMOKE if smoke else {})}, (4, 6) if smoke else spec["latent"],
            (9, 17) if smoke else GPU_FRAMES[name])


def _plan(name: str, smoke: bool, latent_frames: int, block_tokens: Any) -> tuple[int, int]:
    """:func:`call_measure` on a meta model of its own (run in a worker process): peak bytes and FLOPs."""
    import torch

    from video_infinity.families.wan.plan import meta_transformer

    torch.set_num_threads(1)
    config, latent, _ = _gpu_case(name, smoke)
    meta = meta_transformer(config, torch.float32 if smoke else torch.bfloat16)
    planned = call_measure(meta, latent, latent_frames, MODELS[name]["per_token_timestep"], block_tokens)
    return planned.peak_bytes, planned.flops


def gpu_section(smoke: bool, repeats: int, only: list[str] | None) -> dict[str, Any]:
    """Issue 24 items 3 and 5 on a GPU: each model's call planned on meta tensors (the planner's
    :func:`call_measure`) and run with random weights, frame-chunked (default) and whole-clip blocks.
    The plans are counted in worker processes while the GPU runs (they need no GPU; the device's
    time is what is short). A model measured after another in the same process can read a low first
    peak (TI2V-5B at 81 frames after 1.3B on one H200, 12-04: 794.5 MiB, against 1,128.6 alone in a
    fresh process, planned 1,095): memory held from the earlier model (compiled kernels) is freed
    during the call, below the baseline taken before it. Run one model per process (``--only``,
    ``--name``) for clean peaks."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from video_infinity.families.wan.vae import latent_frame_count
    from video_infinity.memory import parameter_bytes

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    names = [name for name in MODELS if not only or any(o in name for o in only)]
    # Forked before CUDA is initialised in this process (a fork after it is unsafe).
    pool = ProcessPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 2)),
                               mp_context=multiprocessing.get_context("fork"))
    plans = {(name, frames, label): pool.submit(_plan, name, smoke, latent_frame_count(frames), block_tokens)
             for name in names for frames in _gpu_case(name, smoke)[2] for label, block_tokens in BLOCKS}
    models: dict[str, Any] = {}
    for name in names:
        spec = MODELS[name]
        config, latent, frames_list = _gpu_case(name, smoke)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        model = real_transformer(config, device, dtype)
        # Its parameters' bytes, and apart what building it added to the allocation: in the run of 12-04,
        # which read the whole allocation, the second model's came out 2.7 GiB (the first model's size)
        # over its parameters; not explained.
        allocated = torch.cuda.memory_allocated() - before if device == "cuda" else None
        rows = []
        for frames in frames_list:
            latent_frames = latent_frame_count(frames)
            for label, block_tokens in BLOCKS:
                planned = Measured(*plans[name, frames, label].result())
                try:
                    ran = measured_call(model, latent, latent_frames, spec["per_token_timestep"], block_tokens,
                                        device, repeats)
                except Exception as exc:  # noqa: BLE001 - recorded; the other rows still run
                    ran = {"peak_bytes": None,
                           "error": "out of memory" if isinstance(exc, torch.OutOfMemoryError)
                           else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
                    logger.exception("%s, %d frames, %s failed", name, frames, label)
                row = {"frames": frames, "latent_frames": latent_frames, "blocks": label,
                       "planned_peak_mib": round(mib(planned.peak_bytes), 1),
                       "tflop": round(planned.flops / 1e12, 2), **ran}
                if ran.get("peak_bytes"):
                    row["measured_peak_mib"] = round(mib(ran["peak_bytes"]), 1)
                    row["reserved_peak_mib"] = round(mib(ran["reserved_bytes"]), 1)
                    row["measured_over_planned"] = round(ran["peak_bytes"] / planned.peak_bytes, 3)
                if ran.get("seconds_median"):
                    row["tflop_per_s"] = round(planned.flops / 1e12 / ran["seconds_median"], 1)
                rows.append(row)
                logger.info("%s, %d frames, %s: planned %.0f MiB, measured %s MiB, %s s", name, frames, label,
                            row["planned_peak_mib"], row.get("measured_peak_mib"), ran.get("seconds_median"))
        for frames in frames_list:  # the whole clip's time over the frame-chunked one (item 4)
            pair = {r["blocks"]: r for r in rows if r["frames"] == frames}
            if all(p.get("seconds_median") for p in pair.values()):
                pair["frame_chunked"]["time_over_whole_clip"] = round(
                    pair["frame_chunked"]["seconds_median"] / pair["whole_clip"]["seconds_median"], 3)
        models[name] = {"config": config, "latent": list(latent),
                        "weights_gib": round(parameter_bytes(model) / 2**30, 2),
                        "allocated_by_build_gib": None if allocated is None else round(allocated / 2**30, 2),
                        "rows": rows}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    pool.shutdown()
    return {"what": "one conditional Wan transformer call (batch 1, 512 text tokens, timestep 500), wan preset on "
                    "one process with the engine's GPU defaults: the planner's peak on meta tensors beside the "
                    "peak and seconds of the same call run with random weights",
            "how": "measured: torch.cuda.max_memory_allocated above the allocation before the call (weights and "
                   "inputs excluded, as planned), first call; seconds: median of the timed calls after it",
            "smoke": smoke, "dtype": str(dtype), "repeats": repeats, "models": models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="plan and measure each call on the CUDA GPU (writes results/one_gpu_cuda.json)")
    parser.add_argument("--smoke", action="store_true", help="with --gpu: the GPU section on CPU at a tiny size "
                        "(checks the script; writes nothing)")
    parser.add_argument("--repeats", type=int, default=2, help="with --gpu: timed calls after the first")
    parser.add_argument("--only", nargs="*", default=None, help="with --gpu: models whose name contains one of these")
    parser.add_argument("--name", default="one_gpu_cuda", help="with --gpu: the result file's name (results/NAME.json)")
    add_commit_argument(parser)
    args = parser.parse_args()
    setup_logging()
    if args.gpu:
        import torch

        if not args.smoke and not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA GPU (--smoke checks the script on CPU)")
        result = gpu_section(args.smoke, args.repeats, args.only)
        if args.smoke:
            logger.info("smoke run, nothing written: %s", result["models"])
            return
        info = machine()
        labels = copy_labels(args.commit, info.get("gpu"), "one_gpu.py --gpu")
        write_result(args.name, {**result, "machine": info}, MEASURES, labels)
        return
    import torch

    from video_infinity.families.wan.plan import meta_transformer
    from video_infinity.families.wan.vae import latent_frame_count
    from video_infinity.memory import parameter_bytes

    padding = 8
    results: dict[str, Any] = {}
    host_flops: dict[int, int] = {}
    for name, spec in MODELS.items():
        model = meta_transformer({**COMMON, **spec["config"]}, torch.bfloat16)
        weights = parameter_bytes(model)
        entry: dict[str, Any] = {"weights_gib": round(weights / 2**30, 2), "calls": {}}
        for block_tokens in ("default", None):
            label = "frame_chunked" if block_tokens == "default" else "whole_clip"
            peaks, flops = {}, {}
            for frames in FRAMES:
                latent_frames = latent_frame_count(frames)
                measured = call_measure(model, spec["latent"], latent_frames, spec["per_token_timestep"], block_tokens)
                peaks[frames], flops[frames] = measured.peak_bytes, measured.flops
                logger.info("%s, %s, %d frames: %.0f MiB, %.1f TFLOP", name, label, frames, mib(peaks[frames]),
                            flops[frames] / 1e12)
            if name == HOST_MODEL and block_tokens == "default":
                host_flops = flops
            first, last = latent_frame_count(FRAMES[1]), latent_frame_count(FRAMES[-1])
            slope = (peaks[FRAMES[-1]] - peaks[FRAMES[1]]) / (last - first)
            constant = peaks[FRAMES[-1]] - slope * last

            def need_bytes(frames: int, world: int) -> float:
                """One GPU: the call's peak; a rank of N: extrapolated (its frames and halo, at most the clip)."""
                if world == 1:
                    return peaks[frames]
                clip = latent_frame_count(frames)
                return constant + slope * min(clip, math.ceil(clip / world) + 2 * padding)

            entry["calls"][label] = {
                "peak_mib": {str(f): round(mib(p), 1) for f, p in peaks.items()},
                "tflop": {str(f): round(x / 1e12, 1) for f, x in flops.items()},
                "mib_per_latent_frame": round(mib(slope), 2),
                "peak_with_weights_gib": {str(f): round((p + weights) / 2**30, 2) for f, p in peaks.items()},
                "fits": {
                    f"{gib} GiB": {
                        f"{world} GPU": {
                            str(frames): {
                                "fits": (need := (need_bytes(frames, world) + weights) / 2**30) <= gib,
                                "need_gib": round(need, 2),
                                "how": "computed on meta tensors" if world == 1 else "extrapolated",
                            } for frames in FRAMES
                        } for world in WORLDS
                    } for gib in GPUS_GIB
                },
            }
        results[name] = entry
    host = host_section(host_flops)
    write_result("one_gpu", {
        "what": "one Wan transformer call (batch 1) at real size on meta tensors: peak working memory, "
                "frame-chunked blocks (block_tokens default) vs diffusers' whole-clip blocks",
        "settings": {"preset": "wan", "dtype": "bfloat16", "split_invariant": False, "text_tokens": 512,
                     "frames": list(FRAMES), "counted_as": "tensor storages alive at once, flash-like attention"},
        "not_counted": "text encoder, VAE decode, CUDA context, allocator slack; N-GPU figures are extrapolated",
        "machine": machine(),
        "models": results,
        "host_overhead": host,
    }, MEASURES)


if __name__ == "__main__":
    main()
