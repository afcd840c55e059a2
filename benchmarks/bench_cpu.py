"""``make bench-cpu``: every CPU result under ``benchmarks/results/`` regenerated, one script after another.

``RUNS`` is the one list of what produces each result file: the CPU runs (the default, about 29
minutes on the 2-core machine of the figures: arguments chosen to fit 30), the ones run separately
(``--extra``: demo-model evaluations and studies of the trained models, long), and the GPU ones
(never run here). ``tests/test_results_labels.py`` checks that every file under ``results/`` is in
it. Each run is timed and the total compared with the estimates; a failed run is reported at the
end (the others still run) and makes the exit status 1.

    python benchmarks/bench_cpu.py [--list] [--only NAME ...] [--extra] [--dry-run]

Run it on a quiet machine: the timings in the results are only as good as the machine was idle
(each result records the load average at its start and end).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("bench_cpu")
ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 30 * 60
"""What the default list must fit on 2 cores (issue 27)."""
BEFORE_COMMIT = "97a81d3"
"""overhead_compare.py's "before": the split-invariant path before its copy reduction (6c04de3..e8a57fe)."""


@dataclass(frozen=True)
class Run:
    name: str
    argv: tuple[str, ...]
    """After the Python executable, run from the repository root; ``{before_src}``: a checkout of BEFORE_COMMIT's src."""
    outputs: tuple[str, ...]
    """Files under benchmarks/results/ the run writes."""
    seconds: int
    """Estimated wall time on the 2-core machine (from earlier runs, which were mostly under load)."""
    group: str = "cpu"
    """"cpu": make bench-cpu; "extra": run separately (--extra); "gpu": needs a CUDA GPU, never run here."""
    note: str = ""


WAN_EVAL = ("-m", "video_infinity.demo.evaluate", "--model", "demo-wan", "--scheduler", "model", "--frames", "17",
            "--threads", "2")
"""The demo-wan evaluation both of its result files share (they differ in seeds and outputs)."""

RUNS: tuple[Run, ...] = (
    Run("communication", ("benchmarks/communication.py",), ("communication.json", "communication.png"), 90,
        note="defaults: worlds 2, 3, 4 and 4 ranks of short clips in gloo processes; 81 s on 12-03"),
    Run("scaling", ("benchmarks/scaling.py", "--repeats", "3"), ("scaling.json",), 85,
        note="3 rounds instead of 6 (100 s at 4 rounds on 12-03)"),
    Run("memory", ("benchmarks/memory.py",), ("memory.json", "memory.png", "attention_memory.json"), 135,
        note="defaults; runs attention_memory.py and includes its result; 131 s on 12-03"),
    Run("memory_fused", ("benchmarks/memory.py", "--fused", "--skip-attention"), ("memory_fused.json", "memory_fused.png"),
        90, note="the fused kernels; the attention part is memory.json's; 86 s on 12-03"),
    Run("overhead", ("benchmarks/overhead.py", "--frames", "24", "--repeats", "5", "--memory-repeats", "2"),
        ("overhead.json",), 200,
        note="24 frames only, 5 rounds, 2 memory processes per variant (defaults: 6 min); 200 s on 12-03"),
    Run("overhead_compare", ("benchmarks/overhead_compare.py", "--before-src", "{before_src}", "--before-label",
                             BEFORE_COMMIT, "--repeats", "3"), ("overhead_compare.json",), 120,
        note=f"before = {BEFORE_COMMIT}'s src (git archive), after = this checkout; 3 rounds (174 s at 5 on 12-03)"),
    Run("quality", ("benchmarks/quality.py", "--steps", "12"), ("quality.json", "quality.png"), 290,
        note="4 prompts x 64 frames, 3 variants, 4 ranks, 12 steps (344 s at the default 15 on 12-03)"),
    Run("one_gpu", ("benchmarks/one_gpu.py",), ("one_gpu.json",), 220,
        note="meta tensors and a CPU host-time proxy, no GPU; 220 s on 12-03"),
    Run("gpu_wan_cpu", ("benchmarks/gpu_wan.py", "--cpu"), ("gpu_wan_cpu.json",), 65,
        note="the small Wan layout on CPU; 61 s on 12-03"),
    Run("freenoise", ("benchmarks/freenoise.py", "--rounds", "2"), ("freenoise.json",), 235,
        note="64, 128, 256 frames, 2 timing rounds; 231 s on 12-03"),
    Run("freenoise_flops", ("benchmarks/freenoise.py", "--count-flops"), ("freenoise_flops.json",), 10,
        note="meta device"),
    Run("pipeline_overhead", ("benchmarks/pipeline_overhead.py",), ("pipeline_overhead.json",), 20,
        note="defaults: 8 frames, 3 steps, 5 rounds; 17 s on 12-03"),
    Run("loop", ("benchmarks/loop.py",), ("loop.json",), 165,
        note="seeds 0-2, with and without the loop: 6 CLI runs on 2 ranks; 160 s on 12-03"),
    Run("loop_top_k8", ("benchmarks/loop.py", "--set", "plugin_configs.attn.top_k=8", "--name", "loop_top_k8"),
        ("loop_top_k8.json",), 165, group="extra",
        note="the loops with 8 global frames: a study of the demo model's direction, not of the engine's cost"),
    Run("demo_direction_seed1000",
        ("-m", "video_infinity.demo.evaluate", "--scheduler", "dpmsolver++", "--steps", "20", "--guidance", "5",
         "--frames", "16", "--base-seed", "1000", "--threads", "2", "--json",
         "benchmarks/results/demo_direction_seed1000.json"), ("demo_direction_seed1000.json",), 500, group="extra",
        note="the demo model's prompt following, 48 prompts (498 s on 12-03)"),
    Run("demo_wan_eval",
        (*WAN_EVAL, "--json", "benchmarks/results/demo_wan_eval.json", "--sheet",
         "benchmarks/results/demo_wan_eval.png"), ("demo_wan_eval.json", "demo_wan_eval.png"), 105, group="extra",
        note="the demo-wan model's prompt following, 48 prompts (101 s on 12-03); re-made with each new demo-wan weights"),
    Run("demo_wan_eval_seed2000",
        (*WAN_EVAL, "--base-seed", "2000", "--json", "benchmarks/results/demo_wan_eval_seed2000.json"),
        ("demo_wan_eval_seed2000.json",), 105, group="extra",
        note="the same on seeds 2000-2047, a second draw of noise (88 s on 12-04)"),
    Run("vae_steps", ("benchmarks/vae_steps.py",), ("vae_steps.json",), 35, group="extra",
        note="the demo-wan VAE's decoded motion steps on ground-truth clips, into a latent frame vs inside one"),
    Run("demo_runs", ("benchmarks/demo_runs.py",), ("demo_runs.json",), 70, group="extra",
        note="make demo and make demo-wan as a user runs them: wall time and the probe's report"),
    Run("demo_wan_seeds", ("benchmarks/demo_runs.py", "--configs", "examples/cpu_demo_wan.json", "--seeds", "12",
                           "--name", "demo_wan_seeds", "--engines", 'wan="wan"',
                           'local only={"attn": {"padding": 8, "top_k": 0}}'), ("demo_wan_seeds.json",), 500,
        group="extra", note="make demo-wan's config over seeds 0-11, the wan preset against local attention only "
                            "(24 CLI runs on 2 ranks; 498 s on 12-03)"),
    Run("dit_settings", ("benchmarks/dit_settings.py",), ("dit_settings.json",), 2900, group="extra",
        note="the DiT engine's settings on demo-wan, an issue of its own; in one process (the estimate: twice the 24 min of "
             "its run split over 2 one-thread processes, then --merge, as its docstring shows)"),
    Run("gpu", ("benchmarks/gpu.py", "--repeats", "3", "--warmup", "1", "--search-seconds", "45"), ("gpu.json",), 65,
        group="gpu", note="one CUDA GPU (VideoCrafter2 size); 64 s on an H200 on 12-04; gpu.json stays, labelled with "
                          "its engine commit, until a GPU re-runs it"),
    Run("gpu_wan", ("benchmarks/gpu_wan.py", "--repeats", "3", "--warmup", "1", "--search-seconds", "50",
                    "--max-latent-frames", "512"), ("gpu_wan.json",), 150, group="gpu",
        note="one CUDA GPU (Wan2.1-1.3B size); about 2.5 min on an H200 on 12-04"),
    Run("one_gpu_cuda", ("benchmarks/one_gpu.py", "--gpu", "--repeats", "1"), ("one_gpu_cuda.json",), 170, group="gpu",
        note="one CUDA GPU: each planned Wan call run at real size (1.3B and TI2V-5B, 81-1,025 frames); 167 s on an "
             "H200 on 12-04 (17:28); the second model's first peak reads low after the first: see one_gpu_cuda_5b"),
    Run("one_gpu_cuda_5b", ("benchmarks/one_gpu.py", "--gpu", "--repeats", "1", "--only", "5B", "--name",
                            "one_gpu_cuda_5b"), ("one_gpu_cuda_5b.json",), 100, group="gpu",
        note="TI2V-5B alone in a fresh process (clean first-call peaks); 100 s on an H200 on 12-04"),
    Run("gpu_run", ("benchmarks/gpu_run.py", "--frames", "81", "321"), ("gpu_run.json",), 420, group="gpu",
        note="one CUDA GPU: a whole Wan2.1-1.3B-size generation (random weights, UMT5-XXL included) through the CLI "
             "against its plan; never run"),
    Run("band_attention", ("benchmarks/band_attention.py",), ("band_attention.json",), 120, group="gpu",
        note="one CUDA GPU: one layer's Wan band attention, the engine's per-frame calls against FlexAttention and "
             "stacked frames (engine suggestion 6); 40 s on an H200 on 12-04 (--frames 21 81)"),
    Run("gpu_profile", ("benchmarks/gpu_profile.py",), ("gpu_profile.json",), 90, group="gpu",
        note="one CUDA GPU: one Wan2.1-1.3B-size call profiled kernel by kernel, diffusers against the engine's "
             "variants (whole window chunked and unchunked, the wan preset per-frame and FlexAttention); never run"),
)


def _before_src(workdir: Path) -> Path:
    """BEFORE_COMMIT's ``src`` unpacked under ``workdir`` (needs the repository's history)."""
    archive = subprocess.run(["git", "archive", "--format=tar", BEFORE_COMMIT, "src"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "src"


def _argv(run: Run, workdir: Path) -> list[str]:
    needs_before = any("{before_src}" in arg for arg in run.argv)
    before = str(_before_src(workdir)) if needs_before else ""
    return [sys.executable, *(arg.replace("{before_src}", before) for arg in run.argv)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print every run with its estimate, run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="just these runs (cpu or extra)")
    parser.add_argument("--extra", action="store_true", help="also the runs made separately (long)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.list:
        for run in RUNS:
            logger.info("%-24s %-5s %5d s  %s  -> %s\n%28s%s", run.name, run.group, run.seconds, " ".join(run.argv),
                        ", ".join(run.outputs), "", run.note)
        default = sum(r.seconds for r in RUNS if r.group == "cpu")
        logger.info("default (cpu) list: about %.0f min estimated, budget %.0f min", default / 60, BUDGET_S / 60)
        return 0
    names = {r.name for r in RUNS}
    if args.only and set(args.only) - names:
        parser.error(f"--only: unknown {sorted(set(args.only) - names)}; known: {sorted(names)}")
    gpu = sorted(set(args.only or ()) & {r.name for r in RUNS if r.group == "gpu"})
    if gpu:
        parser.error(f"--only: {gpu} need a CUDA GPU: run their scripts on a machine with one")
    chosen = [r for r in RUNS if r.group != "gpu" and (r.name in args.only if args.only else
                                                         r.group == "cpu" or (args.extra and r.group == "extra"))]
    logger.info("%d runs, about %.0f min estimated; load average now %s (run on a quiet machine)", len(chosen),
                sum(r.seconds for r in chosen) / 60, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    began, failed, took = time.perf_counter(), [], {}
    for run in chosen:
        with tempfile.TemporaryDirectory(prefix="vi-bench-cpu-") as workdir:
            command = _argv(run, Path(workdir)) if not args.dry_run else [sys.executable, *run.argv]
            logger.info("== %s (about %d s): %s", run.name, run.seconds, " ".join(command[1:]))
            if args.dry_run:
                continue
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env)
            took[run.name] = time.perf_counter() - start
        logger.info("== %s: %s in %.0f s (estimated %d s)", run.name, "done" if done.returncode == 0 else
                    f"FAILED (exit {done.returncode})", took[run.name], run.seconds)
        if done.returncode != 0:
            failed.append(run.name)
    total = time.perf_counter() - began
    if not args.dry_run:
        logger.info("all runs: %.1f min (estimated %.1f)%s", total / 60, sum(r.seconds for r in chosen) / 60,
                    "" if total <= BUDGET_S or args.extra or args.only else
                    f" -- OVER the {BUDGET_S // 60}-minute budget: shorten the arguments in RUNS")
    if failed:
        logger.error("failed: %s (their result files were not rewritten)", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
