"""Evaluate the demo model: colour and direction accuracy over every colour x shape x direction prompt.

    python -m video_infinity.demo.evaluate [--model DIR] [--scheduler ddim dpmsolver++] \\
        [--steps 20] [--guidance 5 7.5] [--frames 16] [--seeds 1] [--json FILE] [--sheet FILE.png]

Samples are made by :class:`video_infinity.VideoInfinityPipeline` (one process, the engine's
default settings), the same path as the command line and the Python API. Each video is
judged by the quality probe (:mod:`video_infinity.demo.probe`). Several schedulers, step counts and
guidance scales may be given: every combination is evaluated on the same seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data

logger = logging.getLogger("video_infinity.demo.evaluate")


def generate(pipe: Any, prompts: list[str], seeds: list[int], frames: int, steps: int, guidance: float,
             scheduler_name: str) -> np.ndarray:
    """uint8 videos (len(prompts), frames, H, W, 3) made by ``pipe`` (a VideoInfinityPipeline, one
    process); prompt i starts from the per-frame noise of ``seeds[i]``."""
    videos = []
    for prompt, seed in zip(prompts, seeds):
        video = pipe(prompt, num_frames=frames, height=data.SIZE, width=data.SIZE, num_inference_steps=steps,
                     guidance_scale=guidance, scheduler=scheduler_name, seed=seed, progress=False).frames[0]
        videos.append((video * 255).round().astype(np.uint8))
    return np.stack(videos)


def evaluate(pipe: Any, scheduler: str, steps: int, guidance: float, frames: int = 16, seeds: int = 1,
             base_seed: int = 1000) -> dict[str, Any]:
    """Probe one sample per prompt and seed; accuracy figures and per-sample rows."""
    from .probe import analyse

    classes = [c for c in data.all_classes() for _ in range(seeds)]
    prompts = [data.caption(*c) for c in classes]
    seed_list = [base_seed + i for i in range(len(prompts))]
    start = time.perf_counter()
    videos = generate(pipe, prompts, seed_list, frames, steps, guidance, scheduler)
    seconds = time.perf_counter() - start
    rows = []
    for (colour, shape, direction), prompt, seed, video in zip(classes, prompts, seed_list, videos):
        report = analyse(video)
        rows.append({
            "prompt": prompt, "seed": seed, "colour": report.colour, "direction": report.direction,
            "colour_ok": report.colour == colour, "direction_ok": report.direction == direction,
            "velocity": report.velocity, "found_frames": report.found_frames,
        })
    n = len(rows)
    per_direction = {d: float(np.mean([r["direction_ok"] for r, c in zip(rows, classes) if c[2] == d]))
                     for d in data.DIRECTIONS}
    return {
        "scheduler": scheduler, "steps": steps, "guidance": guidance, "frames": frames, "samples": n,
        "colour_accuracy": float(np.mean([r["colour_ok"] for r in rows])),
        "direction_accuracy": float(np.mean([r["direction_ok"] for r in rows])),
        "direction_accuracy_by_direction": per_direction,
        "seconds": seconds, "rows": rows, "videos": videos,
    }


def long_video(pipe: Any, prompt: str, total_frames: int, clips: list[range] | None, seed: int, steps: int,
               guidance: float, scheduler_name: str) -> np.ndarray:
    """One long video, uint8 (total_frames, H, W, 3), in this process: every frame at once
    (``clips=None``), or each clip of ``clips`` generated on its own from the same per-frame initial
    noise as a multi-rank run would use, with no communication between clips (a stochastic sampler's
    step noise is then drawn by clip-local frame index)."""
    from ..noise import frame_noise

    parts = []
    for frames in clips or [range(total_frames)]:
        shape = (1, *pipe.family.latent_shape(data.SIZE, data.SIZE))
        video = pipe(prompt, num_frames=len(frames), height=data.SIZE, width=data.SIZE, num_inference_steps=steps,
                     guidance_scale=guidance, scheduler=scheduler_name, seed=seed, progress=False,
                     latents=frame_noise(seed, frames, shape)).frames[0]
        parts.append((video * 255).round().astype(np.uint8))
    return np.concatenate(parts)


def continuity(pipe: Any, model: str, config_file: Path, prompt: str, total_frames: int, ranks: int, seed: int,
               steps: int, guidance: float, scheduler_name: str, out_dir: Path) -> dict[str, Any]:
    """Probe the clip borders of a long video made by ``video-infinity generate`` on ``ranks`` CPU processes
    (the engine: clips talk to each other) and of the same clips made independently, each from the same
    per-frame noise with no communication. Both MP4s are written to ``out_dir``."""
    import subprocess
    import sys

    from ..frames import partition_frames
    from ..video_io import VideoWriter, read_video
    from .probe import analyse

    config = json.loads(Path(config_file).read_text())
    config.update(devices=["cpu"] * ranks, seed=seed, base_path=str(out_dir), model=model)
    config["pipe_configs"].update(prompts=[prompt], total_frames=total_frames, steps=steps, guidance_scale=guidance,
                                  scheduler=scheduler_name, file_name="joint", height=data.SIZE, width=data.SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "joint_config.json").write_text(json.dumps(config, indent=2))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "video_infinity.cli", "generate", "--config", str(out_dir / "joint_config.json"),
                    "--overwrite"], check=True)
    joint_seconds = time.perf_counter() - start
    joint, _ = read_video(out_dir / "joint.mp4")
    independent = long_video(pipe, prompt, total_frames, partition_frames(total_frames, ranks), seed, steps,
                             guidance, scheduler_name)
    with VideoWriter(out_dir / "independent.mp4", data.SIZE, data.SIZE, 8) as writer:
        writer.write(independent)
    return {"joint": {**analyse(joint, ranks=ranks).to_dict(), "seconds": joint_seconds},
            "independent": analyse(independent, ranks=ranks).to_dict()}


MEASURES = ("src/video_infinity/demo/evaluate.py", "src/video_infinity/demo/__init__.py", "src/video_infinity/demo/data.py",
            "src/video_infinity/demo/probe.py", "src/video_infinity/pipeline.py", "src/video_infinity/denoise.py",
            "src/video_infinity/noise.py", "src/video_infinity/schedulers.py", "src/video_infinity/prompts.py",
            "src/video_infinity/engine", "src/video_infinity/families/base.py", "src/video_infinity/families/folder.py")
"""What every evaluation depends on besides the model's folder and its family's package (added at writing):
the sampling loop, the engine and the probe that judges the videos."""
CONTINUITY_MEASURES = ("src/video_infinity/cli.py", "src/video_infinity/run")
"""--continuity makes its joint video with the command line, in processes of its own."""


def _provenance(argv: list[str], model: str | Path | None, extra: tuple[str, ...] = (),
                machine: dict[str, Any] | None = None, family: str | None = None) -> dict[str, Any]:
    """The result's labels (:mod:`video_infinity.demo.provenance`): the command, when, the checkout's
    commit (if the package runs from one), the machine, the environment knobs, and ``measures``: this
    module and the sampling code, the model's folder when it is in the repository (the embedded weights),
    its ``family``'s package, and ``extra``. ``machine``: as described when the run started."""
    import shlex

    from .provenance import labels, repository_root

    root = repository_root()
    declared = list(MEASURES + extra) + ([f"src/video_infinity/families/{family}"] if family else [])
    if root is not None and model is not None and Path(model).resolve().is_relative_to(root):
        declared.append(Path(model).resolve().relative_to(root).as_posix())
    return labels(root, shlex.join(["python", "-m", "video_infinity.demo.evaluate", *argv]), declared,
                  machine_info=machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m video_infinity.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder, or an embedded model's name: demo (the default), demo-wan")
    parser.add_argument("--scheduler", nargs="+", default=["ddim"])
    parser.add_argument("--steps", nargs="+", type=int, default=[20])
    parser.add_argument("--guidance", nargs="+", type=float, default=[5.0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1, help="samples per prompt")
    parser.add_argument("--base-seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device for the 48-prompt evaluation (e.g. cuda)")
    parser.add_argument("--json", type=Path, default=None, help="write the results (without videos) here")
    parser.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG of the last setting's samples")
    parser.add_argument("--continuity", metavar="PROMPT", default=None,
                        help="instead: border jumps of one long video made jointly vs clip by clip")
    parser.add_argument("--total-frames", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", type=Path, default=Path("examples/cpu_demo.json"),
                        help="with --continuity: run config for the joint video (prompt, frames, sampler replaced)")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/continuity"),
                        help="with --continuity: where both videos go")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # a script's own
    torch.set_num_threads(args.threads)
    from ..pipeline import VideoInfinityPipeline
    from .provenance import machine

    started_on = machine()  # the load average before the run, not after it

    from . import resolve_model

    given = args.model if args.model is not None else "demo"
    args.model = resolve_model(args.model)  # None or "demo": the embedded demo model; "demo-wan": the Wan one
    if args.continuity is not None:
        engine = json.loads(Path(args.config).read_text()).get("plugin_configs")
        pipe = VideoInfinityPipeline.from_pretrained(args.model, engine=engine, device=args.device)
        result = continuity(pipe, args.model, args.config, args.continuity, args.total_frames, args.ranks,
                            args.base_seed, args.steps[0], args.guidance[0], args.scheduler[0], args.out_dir)
        for name, report in result.items():
            print(f"{name:>12}: colour {report['colour']} direction {report['direction']} median step "
                  f"{report['median_step']:.2f} px, border jumps {[round(j, 2) for j in report['border_jumps']]} "
                  f"(max / median step {report['border_ratio']:.2f})", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps({"model": given, **_provenance(argv, args.model, CONTINUITY_MEASURES, started_on,
                                                                      pipe.family.name),
                                             **result}, indent=2, default=str) + "\n")
        return 0
    pipe = VideoInfinityPipeline.from_pretrained(args.model, device=args.device)
    results = []
    for scheduler, steps, guidance in itertools.product(args.scheduler, args.steps, args.guidance):
        result = evaluate(pipe, scheduler, steps, guidance, args.frames, args.seeds, args.base_seed)
        results.append(result)
        print(f"{scheduler:>18} steps {steps:3d} guidance {guidance:5.2f}: colour {result['colour_accuracy']:6.1%}  "
              f"direction {result['direction_accuracy']:6.1%}  over {result['samples']} samples "
              f"({result['seconds']:.0f} s)  by direction "
              + " ".join(f"{d} {a:.0%}" for d, a in result["direction_accuracy_by_direction"].items()), flush=True)
    if args.sheet is not None:
        from ..video_io import videos_sheet, write_png

        write_png(args.sheet, videos_sheet(results[-1]["videos"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": given, **_provenance(argv, args.model, machine=started_on,
                                                                      family=pipe.family.name), "results": [
            {k: v for k, v in r.items() if k != "videos"} for r in results]}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
