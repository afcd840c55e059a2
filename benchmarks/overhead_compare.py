"""Split-invariant overhead before and after an engine change, in one process, interleaved.

Loads a second copy of the package (another commit's ``src`` directory, e.g. from
``git archive <commit> src | tar -x -C /tmp/before``) under the name ``video_infinity_before`` and
times, in the same rounds (order rotating every round), on the same weights and inputs:
  * ``diffusers``: the unmodified UNet3DConditionModel;
  * ``{before,after}_whole_window``: split-invariant engine, window covering the clip;
  * ``{before,after}_default``: split-invariant engine, the published dual-scope settings;
  * ``after_whole_window_fused``: the fused engine (``split_invariant: false``), for reference.
Each ratio is the median over rounds of the per-round ratio to diffusers (robust to slow phases of
a shared machine). Also reports each whole-window variant's max abs difference to diffusers.

    python benchmarks/overhead_compare.py --before-src /tmp/before/src --before-label 4047fb5 [--frames 24]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from _common import (BENCH_UNET, ENGINE_DEFAULT, ENGINE_WHOLE_WINDOW, ENGINE_WHOLE_WINDOW_FUSED, UNET3D_ENGINE, bench_inputs,
                     build_unet, interleaved, machine, paired_ratio, setup_logging, write_result)

logger = logging.getLogger("overhead_compare")
MEASURES = UNET3D_ENGINE
"""The "after" engine (this checkout); "before" is the other checkout, recorded by its label."""
TIMESTEP = 500


def load_package_copy(src: Path, name: str) -> Any:
    """Import ``src/video_infinity`` as the package ``name`` (its imports are relative)."""
    init = src / "video_infinity" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--before-src: {init} does not exist; give the src directory of another checkout")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-src", type=Path, required=True, help="the src directory of the 'before' checkout")
    parser.add_argument("--before-label", default="before", help="what 'before' is (e.g. its commit), recorded")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--latent", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    import video_infinity as after

    torch.set_num_threads(args.threads)
    setup_logging()
    before = load_package_copy(args.before_src.resolve(), "video_infinity_before")
    info = machine()
    logger.info("machine: %s, %d CPUs, torch %s (%d threads), load average %s", info["cpu"], info["host_cpus"],
                info["torch"], info["torch_threads"], info["load_average_at_start"])
    variants = {
        "diffusers": None,
        "before_whole_window": (before, ENGINE_WHOLE_WINDOW),
        "after_whole_window": (after, ENGINE_WHOLE_WINDOW),
        "before_default": (before, ENGINE_DEFAULT),
        "after_default": (after, ENGINE_DEFAULT),
        "after_whole_window_fused": (after, ENGINE_WHOLE_WINDOW_FUSED),
    }
    base = build_unet(BENCH_UNET, args.latent)
    models = {}
    for name, variant in variants.items():
        models[name] = copy.deepcopy(base)
        if variant is not None:
            package, settings = variant
            package.parallelize(models[name], settings)
    sample, text = bench_inputs(1, args.frames, args.latent, args.batch)
    outputs: dict[str, Any] = {}

    def call(name: str):
        def run() -> None:
            with torch.no_grad():
                outputs[name] = models[name](sample, TIMESTEP, encoder_hidden_states=text).sample
        return run

    times = interleaved({name: call(name) for name in variants}, args.repeats, args.warmup,
                        on_round=lambda r: logger.info("round %d/%d done", r + 1, args.repeats))
    rows = []
    for name in variants:
        diff = None
        if "whole_window" in name:
            diff = (outputs[name] - outputs["diffusers"]).abs().max().item()
        rows.append({"variant": name, "seconds_median": sorted(times[name])[len(times[name]) // 2], "seconds": times[name],
                     "time_ratio": paired_ratio(times[name], times["diffusers"]), "max_abs_diff_vs_diffusers": diff})
        logger.info("%-26s median %.3f s  time ratio %.3f%s", name, rows[-1]["seconds_median"], rows[-1]["time_ratio"],
                    "" if diff is None else f"  max abs diff vs diffusers {diff:.2e}")
    write_result("overhead_compare", {
        "machine": info, "unet": BENCH_UNET, "frames": args.frames, "latent": args.latent, "batch": args.batch,
        "timestep": TIMESTEP, "repeats": args.repeats, "warmup": args.warmup, "before": args.before_label,
        "variants": {name: None if v is None else v[1] for name, v in variants.items()}, "rows": rows,
    }, MEASURES)


if __name__ == "__main__":
    main()
