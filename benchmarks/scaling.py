"""Weak scaling on CPU with gloo: 1 vs 2 processes, frames per rank fixed.

One denoising step = one UNet call with the CFG batch (2). Two gloo processes run for the whole
benchmark, one torch thread each, and every round times, in rotating order:
  * ``world1``: rank 0 alone denoises its clip with a single-process engine (rank 1 idles in a
    barrier): the 1-process baseline;
  * ``world1_concurrent``: both ranks at once, each its clip with a single-process engine (no
    messages): the same compute as world2 minus the halo frames, under the same CPU contention --
    world2 / world1_concurrent is the cost of communication and synchronisation alone;
  * ``world2``: both ranks, one clip each (twice the video), the engine as it is: halo and global
    frames are posted before the attention's query projection and waited for after it; a temporal
    conv computes its first GroupNorm's statistics while its halo travels;
  * ``world2_no_overlap``: the same, but every exchange is waited for as soon as it is posted
    (benchmark-side monkeypatch), to show what the engine's overlap buys;
  * ``world2_cfg_split``: the unconditional and conditional halves as two batch-1 calls, to show what
    batching CFG into one call buys (half the messages, same bytes).
Time in communication is measured by wrapping ``torch.distributed.batch_isend_irecv`` (posting, and
each request's ``wait``) and ``torch.distributed.all_gather`` with timers, in the benchmark processes
only. It includes waiting for the other rank to arrive (load imbalance), which is what a step pays.

The step time of a round is the slower rank's. Ideal weak scaling keeps world2 == world1. NOTE: the
machine these figures come from has 2 CPU cores shared with other work, so the 2 ranks compete
with everything else for 2 cores: read the ratio as an upper bound of the parallel overhead.

    python benchmarks/scaling.py [--frames-per-rank 16] [--latent 24] [--repeats 6]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from typing import Any

from _common import BENCH_UNET, ENGINE_DEFAULT, UNET3D_ENGINE, machine, run_ranks, setup_logging, write_result

logger = logging.getLogger("scaling")
MEASURES = UNET3D_ENGINE

VARIANTS = ("world1", "world1_concurrent", "world2", "world2_no_overlap", "world2_cfg_split")
TIMESTEP = 500


class CommTimer:
    """Wraps torch.distributed's collectives used by the engine with wall-clock timers."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.seconds = 0.0
        self.calls = 0
        self.overlap = True
        self._batch = dist.batch_isend_irecv
        self._all_gather = dist.all_gather
        dist.batch_isend_irecv = self._timed_batch
        dist.all_gather = self._timed_all_gather

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def _timed_batch(self, ops):
        start = time.perf_counter()
        requests = self._batch(ops)
        if not self.overlap:
            for request in requests:
                request.wait()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        # A gloo request must not be waited for twice (a second wait blocks for another message).
        return [_TimedRequest(r, self, done=not self.overlap) for r in requests]

    def _timed_all_gather(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._all_gather(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


class _TimedRequest:
    def __init__(self, request: Any, timer: CommTimer, done: bool = False) -> None:
        self.request, self.timer, self.done = request, timer, done

    def wait(self, *args, **kwargs):
        if self.done:
            return True
        start = time.perf_counter()
        try:
            return self.request.wait(*args, **kwargs)
        finally:
            self.timer.seconds += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self.request, name)


def _scaling_rank(rank: int, world: int, frames_per_rank: int, latent: int, batch: int, repeats: int, warmup: int,
                  settings: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from _common import bench_inputs, build_unet
    from video_infinity import parallelize
    from video_infinity.context import ClipContext

    timer = CommTimer()
    base = build_unet(BENCH_UNET, latent)
    single = copy.deepcopy(base)
    parallelize(single, settings, ClipContext())
    ctx = ClipContext.from_process_group(frames_per_rank * world)
    parallelize(base, settings, ctx)
    sample, text = bench_inputs(rank, frames_per_rank, latent, batch)

    def world1() -> None:
        if rank == 0:
            single(sample, TIMESTEP, encoder_hidden_states=text)

    def world1_concurrent() -> None:
        single(sample, TIMESTEP, encoder_hidden_states=text)

    def world2() -> None:
        base(sample, TIMESTEP, encoder_hidden_states=text)

    def world2_cfg_split() -> None:
        for half in range(batch):
            base(sample[half:half + 1], TIMESTEP, encoder_hidden_states=text[half:half + 1])

    runs = {"world1": world1, "world1_concurrent": world1_concurrent, "world2": world2, "world2_no_overlap": world2, "world2_cfg_split": world2_cfg_split}
    seconds = {name: [] for name in VARIANTS}
    comm = {name: [] for name in VARIANTS}
    bytes_sent = {}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            shift = round_index % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                timer.overlap = name != "world2_no_overlap"
                dist.barrier()
                timer.reset()
                ctx.stats.reset()
                start = time.perf_counter()
                runs[name]()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    seconds[name].append(elapsed)
                    comm[name].append(timer.seconds)
                    bytes_sent[name] = ctx.stats.total
    return {"rank": rank, "seconds": seconds, "comm_seconds": comm, "bytes_sent": bytes_sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-rank", type=int, default=16)
    parser.add_argument("--latent", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    setup_logging()
    info = machine()
    info["torch_threads"] = 1  # per rank
    logger.info("machine: %s, %d CPU cores (shared with other work), gloo, 1 torch thread per rank, load average %s",
                info["cpu"], info["host_cpus"], info["load_average_at_start"])
    logger.info("UNet %s, %dx%d latents, batch %d (CFG), %d frames per rank, engine defaults (padding 8, top_k 16)",
                BENCH_UNET["block_out_channels"], args.latent, args.latent, args.batch, args.frames_per_rank)
    ranks = run_ranks(_scaling_rank, 2, args.frames_per_rank, args.latent, args.batch, args.repeats, args.warmup,
                      ENGINE_DEFAULT)

    rows = {}
    for name in VARIANTS:
        active = [ranks[0]] if name == "world1" else ranks
        step = [max(r["seconds"][name][i] for r in active) for i in range(args.repeats)]
        share = [statistics.median(c / s for c, s in zip(r["comm_seconds"][name], r["seconds"][name])) for r in active]
        rows[name] = {
            "step_seconds": step, "step_seconds_median": statistics.median(step),
            "comm_seconds_median_per_rank": [statistics.median(r["comm_seconds"][name]) for r in active],
            "comm_share_per_rank": share,
            "bytes_sent_per_rank": [r["bytes_sent"].get(name, 0) for r in active],
        }
    w1 = rows["world1"]["step_seconds"]
    for name in VARIANTS:
        rows[name]["ratio_to_world1"] = statistics.median(a / b for a, b in zip(rows[name]["step_seconds"], w1))

    logger.info("")
    logger.info("%-19s %6s %12s %14s %15s %14s", "variant", "frames", "s per step", "vs 1 process", "comm share",
                "MiB sent/rank")
    for name in VARIANTS:
        row = rows[name]
        frames = args.frames_per_rank * (1 if name == "world1" else 2)  # world1_concurrent: 2 separate clips
        logger.info("%-19s %6d %12.3f %14.3f %15s %14s", name, frames, row["step_seconds_median"], row["ratio_to_world1"],
                    "/".join(f"{s:.1%}" for s in row["comm_share_per_rank"]),
                    "/".join(f"{b / 2**20:.1f}" for b in row["bytes_sent_per_rank"]))
    contention = rows["world1_concurrent"]["ratio_to_world1"]
    comm_cost = statistics.median(a / b for a, b in zip(rows["world2"]["step_seconds"], rows["world1_concurrent"]["step_seconds"]))
    logger.info("weak scaling efficiency (1-process step / 2-process step): %.2f", 1 / rows["world2"]["ratio_to_world1"])
    logger.info("  of which CPU contention (2 busy ranks on 2 shared cores, no messages): x%.2f; communication and "
                "synchronisation (world2 / world1_concurrent): x%.2f", contention, comm_cost)
    write_result("scaling", {
        "machine": info, "note": "2 CPU cores, shared with other processes; 1 torch thread per rank; gloo over loopback",
        "unet": BENCH_UNET, "latent": args.latent, "batch": args.batch, "frames_per_rank": args.frames_per_rank,
        "settings": "engine defaults (padding 8, top_k 16, phase biases)", "timestep": TIMESTEP,
        "repeats": args.repeats, "warmup": args.warmup, "variants": rows,
        "weak_scaling_efficiency": 1 / rows["world2"]["ratio_to_world1"],
        "cpu_contention_factor": contention, "communication_factor": comm_cost,
    }, MEASURES)


if __name__ == "__main__":
    main()
