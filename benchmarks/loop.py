"""Seamless loops on the embedded demo model: the object's jump from the last frame back to the first.

Generates ``examples/cpu_loop.json`` (one prompt, 2 CPU ranks) with the command line, for each seed
with ``plugin_configs.loop`` true and false (everything else equal, the same per-frame initial
noise), and probes each video with ``video-infinity inspect --json``. Reports, per video, the wrap
jump (object step from the last frame to the first, px, the short way round the frame) against the
median step inside clips, the clip-border jump ratio and the direction the object took, and the
denoising time from the run's sidecar. A seamless loop has a wrap jump of about one ordinary step;
the video's length is chosen so that the demo model's usual ~4 px/frame does not close the loop by
itself (40 frames x 4 px = 2.5 laps of the 64 px frame).

    python benchmarks/loop.py [--config examples/cpu_loop.json] [--seeds 0 1 2] [--set KEY=VALUE ...] [--name loop]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from _cli_runs import cli, free_port, repository_path
from _common import CLI, DEMO_MODEL, PIPELINE, PROBE, UNET3D_ENGINE, machine, setup_logging, write_result

logger = logging.getLogger("loop")
MEASURES = (*UNET3D_ENGINE, *PIPELINE, *DEMO_MODEL, *PROBE, *CLI)
"""The videos are made and probed by the command line, in processes of their own; the run config is added."""
ROOT = Path(__file__).resolve().parent.parent


def _one(config: Path, seed: int, loop: bool, out_dir: Path, overrides: list[str]) -> dict:
    name = f"seed{seed}_{'loop' if loop else 'no_loop'}"
    started = time.perf_counter()
    cli("generate", "--config", str(config), "--overwrite", "--set", f"seed={seed}",
         "--set", f"plugin_configs.loop={json.dumps(loop)}", "--set", f"base_path={out_dir}",
         "--set", f"pipe_configs.file_name={name}", "--set", f"master_port={free_port()}",
         *[arg for item in overrides for arg in ("--set", item)])
    wall = time.perf_counter() - started
    sidecar = json.loads((out_dir / f"{name}.json").read_text())
    report = json.loads(cli("inspect", str(out_dir / f"{name}.mp4"), "--ranks", str(sidecar["world_size"]), "--json",
                             # this benchmark's own sheets from an earlier run are replaced, as the videos are
                             "--contact-sheet", str(out_dir / f"{name}.png"), "--overwrite"))
    return {"seed": seed, "loop": loop, "wall_s": round(wall, 1), "world_size": sidecar["world_size"],
            "frames": report["frames"], "direction": report["direction"], "median_step": report["median_step"],
            "wrap_jump": report["wrap_jump"], "wrap_ratio": report["wrap_ratio"],
            "border_ratio": report["border_ratio"], "timings": sidecar.get("timings")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "cpu_loop.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="loop", help="results/<name>.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every video, as video-infinity generate's --set")
    parser.add_argument("--videos", type=Path, default=ROOT / "outputs" / "loop_benchmark",
                        help="where the videos go (with contact sheets)")
    args = parser.parse_args()
    setup_logging()
    host = machine()
    rows = []
    args.videos.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for loop in (True, False):  # side by side, one seed at a time
            rows.append(_one(args.config, seed, loop, args.videos, args.overrides))
            logger.info("seed %d loop %-5s: %s, median step %.2f px, wrap jump %.2f px (%.2f steps), "
                        "border %.2f steps, %.0f s", seed, loop, rows[-1]["direction"], rows[-1]["median_step"],
                        rows[-1]["wrap_jump"] or float("nan"), rows[-1]["wrap_ratio"] or float("nan"),
                        rows[-1]["border_ratio"] or float("nan"), rows[-1]["wall_s"])
    summary = {}
    for loop in (True, False):
        ratios = [r["wrap_ratio"] for r in rows if r["loop"] == loop and r["wrap_ratio"] is not None]
        summary["loop" if loop else "no_loop"] = {
            "median_wrap_ratio": statistics.median(ratios) if ratios else None,
            "max_wrap_ratio": max(ratios) if ratios else None,
        }
    print(f"{'seed':>4} {'loop':>5} {'direction':>9} {'step px':>7} {'wrap px':>7} {'wrap/step':>9} {'border/step':>11}")
    for r in rows:
        print(f"{r['seed']:>4} {str(r['loop']):>5} {r['direction']:>9} {r['median_step']:>7.2f} "
              f"{(r['wrap_jump'] or float('nan')):>7.2f} {(r['wrap_ratio'] or float('nan')):>9.2f} "
              f"{(r['border_ratio'] or float('nan')):>11.2f}")
    for name, figures in summary.items():
        print(f"{name}: median wrap jump / step {figures['median_wrap_ratio']:.2f}, max {figures['max_wrap_ratio']:.2f}")
    config = json.loads(args.config.read_text())
    write_result(args.name, {"machine": host, "config": str(args.config.relative_to(ROOT)
                                                                if args.config.is_relative_to(ROOT) else args.config),
                            "overrides": args.overrides,
                            "pipe_configs": config["pipe_configs"], "plugin_configs": config["plugin_configs"],
                            "videos": rows, "summary": summary}, [*MEASURES, *repository_path(args.config)])


if __name__ == "__main__":
    main()
