"""Quality at clip borders on the embedded demo model: is a long video continuous where clips meet?

Every variant is made by ``video_infinity.VideoInfinityPipeline`` (the same path as the CLI).
One long video per prompt (default 64 frames = 4 clips of 16, the length the demo model was trained
on), the same initial per-frame noise for every variant:
  * ``video_infinity``: the engine with its default settings, one clip per gloo process (4 ranks);
  * ``independent``: each clip generated on its own as a whole video by the pipeline in one process,
    from the clip's frames of the same per-frame initial noise: no communication at all, what a
    naive split would give (a stochastic sampler's step noise is then drawn by clip-local frame);
  * ``norm_clip``: the engine with ``norm_scope: "clip"`` (GroupNorm statistics per clip, as the
    original method), 4 ranks;
  * ``one_process`` (with ``--check-one-process``): the engine on one process holding the whole
    video (a check: the 4-rank result must be the same video up to floating-point rounding).
Measures, per variant, averaged over the prompts, on the decoded uint8 frames:
  * mean absolute difference (MAD, 0..255) between consecutive frames at clip borders (last frame of
    a clip -> first of the next) and inside clips; VBench's temporal flickering score
    (255 - MAD) / 255 of each; and border MAD / inside MAD;
  * the moving object (``video_infinity.demo.probe``'s tracker): its step at each border vs its
    median velocity inside clips (|border step - velocity| in pixels, and the same deviation for steps
    inside clips), and the probe's largest border jump / median step.
Expected: Video-Infinity's border changes close to its inside-clip changes, independent clips' clearly
larger. Without the shipped trained demo model (``demo/weights``), ``default_model_path()`` gives a
random model whose videos are noise: the script still runs and says so.

    python benchmarks/quality.py [--frames 64] [--ranks 4] [--steps 15] [--model DIR] [--check-one-process]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import DEMO_MODEL, PIPELINE, PROBE, RESULTS, UNET3D_ENGINE, machine, run_ranks, setup_logging, write_result

logger = logging.getLogger("quality")
MEASURES = (*UNET3D_ENGINE, *PIPELINE, *DEMO_MODEL, *PROBE)

PROMPTS = ["a red circle moving right", "a blue square moving down", "a green triangle moving left",
           "a yellow circle moving up"]
VARIANTS = ("video_infinity", "independent", "norm_clip", "one_process")


def _latents(pipe: Any, prompts: list[str], seeds: list[int], frames: int, steps: int, guidance: float,
             scheduler_name: str, clip: range | None = None) -> Any:
    """The pipeline's final latents (len(prompts), C, frames, h, w) of each prompt's video (prompt i from
    the per-frame noise of ``seeds[i]``), on rank 0 of a distributed run (None elsewhere). With ``clip``,
    the frames ``clip`` of that video made alone, from the same per-frame initial noise."""
    import torch

    from video_infinity.demo import data
    from video_infinity.noise import frame_noise

    results = []
    for prompt, seed in zip(prompts, seeds):
        noise = None
        if clip is not None:
            noise = frame_noise(seed, clip, (1, *pipe.family.latent_shape(data.SIZE, data.SIZE)))
        out = pipe(prompt, num_frames=frames if clip is None else len(clip), height=data.SIZE, width=data.SIZE,
                   num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler_name, seed=seed,
                   latents=noise, output_type="latent", progress=False)
        results.append(out.frames)
    return None if results[0] is None else torch.cat(results)


def _rank(rank: int, world: int, model: str, prompts: list[str], seeds: list[int], total: int, steps: int,
          guidance: float, scheduler_name: str, engine: dict[str, Any], out: str) -> dict[str, Any]:
    import torch

    from video_infinity import VideoInfinityPipeline

    pipe = VideoInfinityPipeline.from_pretrained(model, engine=engine, device="cpu")
    start = time.perf_counter()
    latents = _latents(pipe, prompts, seeds, total, steps, guidance, scheduler_name)
    if latents is not None:
        torch.save(latents, Path(out) / "latents.pt")
    return {"rank": rank, "seconds": time.perf_counter() - start}


def _decode(pipe: Any, latents: Any) -> np.ndarray:
    """uint8 videos (prompts, frames, H, W, 3)."""
    import torch

    from video_infinity.context import ClipContext

    return np.stack([torch.cat(list(pipe.stream_frames(latents[i:i + 1], ClipContext(), uint8=True))).numpy()
                     for i in range(len(latents))])


def video_metrics(video: np.ndarray, borders: list[int]) -> dict[str, Any]:
    """Border vs inside-clip changes of one uint8 video (frames, H, W, 3)."""
    from video_infinity.demo import probe

    frames = video.astype(np.float64)
    mad = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # pair i: frame i -> i + 1
    at_border = np.zeros(len(mad), bool)
    at_border[[b - 1 for b in borders]] = True
    n, height, width, _ = video.shape
    centres = probe.track(video)
    steps = probe.steps(centres, width, height)
    inside_steps = steps[~at_border]
    valid = inside_steps[np.isfinite(inside_steps).all(axis=1)]
    velocity = np.median(valid, axis=0) if len(valid) else np.array([math.nan, math.nan])
    deviation = np.hypot(*(steps - velocity).T)  # |step - velocity| per pair, NaN where the object is lost
    report = probe.analyse(video, clip_frames=None, ranks=None)
    report_borders = probe.analyse(video, clip_frames=borders[0] if borders else None)

    def finite_mean(values: np.ndarray) -> float:
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else math.nan

    return {
        "mad_per_pair": mad.tolist(),
        "mad_border": float(mad[at_border].mean()), "mad_inside": float(mad[~at_border].mean()),
        "object_found_frames": int(np.isfinite(centres[:, 0]).sum()),
        "velocity": velocity.tolist(), "colour": report.colour, "direction": report.direction,
        "position_per_frame": centres.tolist(),
        "step_deviation_border": finite_mean(deviation[at_border]),
        "step_deviation_inside": finite_mean(deviation[~at_border]),
        "border_jump_over_median_step": report_borders.border_ratio,
    }


def summarise(per_video: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        values = [v[key] for v in per_video if v[key] is not None and math.isfinite(v[key])]
        return float(np.mean(values)) if values else math.nan

    mad_b, mad_i = mean("mad_border"), mean("mad_inside")
    dev_b, dev_i = mean("step_deviation_border"), mean("step_deviation_inside")
    return {
        "mad_border": mad_b, "mad_inside": mad_i, "mad_ratio": mad_b / mad_i,
        "flicker_border": (255 - mad_b) / 255, "flicker_inside": (255 - mad_i) / 255,
        "step_deviation_border_px": dev_b, "step_deviation_inside_px": dev_i,
        "border_jump_over_median_step": mean("border_jump_over_median_step"),
        "object_found_fraction": float(np.mean([v["object_found_frames"] for v in per_video])) / len(per_video[0]["position_per_frame"]),
    }


def _unwrapped(centres: np.ndarray) -> np.ndarray:
    """Positions (frames, 2) with the wrap-around at the frame edges undone (steps taken the short way)."""
    from video_infinity.demo import data, probe

    steps = probe.steps(centres, data.SIZE, data.SIZE)
    out = np.full_like(centres, np.nan)
    position = centres[0].copy()
    out[0] = position
    for i, step in enumerate(steps, start=1):
        if np.isfinite(step).all():
            position = position + step
            out[i] = position
        elif np.isfinite(centres[i]).all():  # re-acquired after a lost frame: restart from the measured point
            position = centres[i].copy()
            out[i] = position
    return out


def _plot(results: dict[str, Any], borders: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    styles = {"video_infinity": "-", "independent": "--", "norm_clip": ":", "one_process": "-."}
    for name in ("video_infinity", "independent", "norm_clip"):
        mad = np.mean([v["mad_per_pair"] for v in results[name]["videos"]], axis=0)
        top.plot(np.arange(len(mad)) + 1, mad, styles[name], label=name)
        video = results[name]["videos"][0]
        positions = _unwrapped(np.asarray(video["position_per_frame"], float))
        axis = 0 if abs(video["velocity"][0]) >= abs(video["velocity"][1]) else 1
        bottom.plot(np.arange(len(positions)), positions[:, axis], styles[name], marker=".", label=name)
    for ax in (top, bottom):
        for b in borders:
            ax.axvline(b - 0.5 if ax is bottom else b, color="grey", alpha=0.4, lw=3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("MAD frame i-1 -> i (0..255)")
    top.set_title("change between consecutive frames, mean over prompts (grey: clip borders)")
    bottom.set_ylabel("object position along its motion\n(px, unwrapped across the frame edges)")
    bottom.set_xlabel("frame")
    bottom.set_title(f"tracked object, first prompt: {results['prompts'][0]!r}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: video_infinity.demo.default_model_path())")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpmsolver++")
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--seed", type=int, default=7, help="prompt i uses seed + i")
    parser.add_argument("--engine", type=json.loads, default={}, help="engine settings as JSON (default: the defaults)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (each rank and the main process)")
    parser.add_argument("--check-one-process", action="store_true",
                        help="also run the engine on one process over the whole video and compare with the ranks' result")
    args = parser.parse_args()
    setup_logging()
    import torch

    from video_infinity import VideoInfinityPipeline
    from video_infinity.demo import WEIGHTS_DIR, default_model_path
    from video_infinity.frames import partition_frames

    torch.set_num_threads(args.threads)
    info = machine()
    model = args.model or str(default_model_path())
    shipped = Path(model).resolve() == WEIGHTS_DIR.resolve()
    trained = shipped or args.model is not None
    model_note = ("the shipped trained demo model" if shipped else "given with --model" if args.model
                  else "RANDOM weights: the trained demo model is not shipped")
    if not trained:
        logger.warning("NOTE: the trained demo model is not shipped (%s is missing): running on %s, a RANDOM model "
                       "whose videos are noise, so the figures below say nothing about quality", WEIGHTS_DIR, model)
    pipe = VideoInfinityPipeline.from_pretrained(model, engine=args.engine, device="cpu")
    seeds = [args.seed + i for i in range(len(args.prompts))]
    clips = partition_frames(args.frames, args.ranks)
    borders = [c.start for c in clips[1:]]
    logger.info("model %s; %d frames in %d clips (borders at %s); %d prompts; %s, %d steps, guidance %.1f; engine %s",
                model, args.frames, args.ranks, borders, len(args.prompts), args.scheduler, args.steps, args.guidance,
                json.dumps(args.engine))
    common = (args.prompts, seeds, args.frames, args.steps, args.guidance, args.scheduler)
    latents, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="vi-quality-") as tmp:
        for name, engine in (("video_infinity", args.engine), ("norm_clip", {**args.engine, "norm_scope": "clip"})):
            start = time.perf_counter()
            out = Path(tmp, name)
            out.mkdir()
            run_ranks(_rank, args.ranks, model, *common, engine, str(out), threads=args.threads)
            latents[name] = torch.load(out / "latents.pt")
            seconds[name] = time.perf_counter() - start
            logger.info("  %s: %.0f s", name, seconds[name])
    start = time.perf_counter()
    latents["independent"] = torch.cat([
        _latents(pipe, args.prompts, seeds, args.frames, args.steps, args.guidance, args.scheduler, clip)
        for clip in clips], dim=2)
    seconds["independent"] = time.perf_counter() - start
    logger.info("  independent: %.0f s", seconds["independent"])
    same = None
    if args.check_one_process:
        start = time.perf_counter()
        latents["one_process"] = _latents(pipe, args.prompts, seeds, args.frames, args.steps, args.guidance,
                                          args.scheduler)
        seconds["one_process"] = time.perf_counter() - start
        logger.info("  one_process: %.0f s", seconds["one_process"])
        same = (latents["one_process"] - latents["video_infinity"]).abs().max().item()

    results: dict[str, Any] = {"prompts": args.prompts}
    variants = [name for name in VARIANTS if name in latents]
    for name in variants:
        videos = _decode(pipe, latents[name])
        per_video = [video_metrics(v, borders) for v in videos]
        results[name] = {"summary": summarise(per_video), "videos": per_video, "seconds": seconds[name]}

    logger.info("")
    logger.info("%-15s %10s %10s %8s %10s %10s %12s %12s %10s", "variant", "MAD border", "MAD inside", "ratio",
                "flicker b", "flicker i", "dev border", "dev inside", "jump/step")
    for name in variants:
        s = results[name]["summary"]
        logger.info("%-15s %10.2f %10.2f %8.2f %10.4f %10.4f %12.2f %12.2f %10.2f", name, s["mad_border"], s["mad_inside"],
                    s["mad_ratio"], s["flicker_border"], s["flicker_inside"], s["step_deviation_border_px"],
                    s["step_deviation_inside_px"], s["border_jump_over_median_step"])
    logger.info("(MAD: mean absolute difference of consecutive frames, 0..255; flicker: (255 - MAD) / 255; dev: "
                "|object step - its median velocity| in px; jump/step: largest border jump / median step)")
    if same is not None:
        logger.info("%d-rank Video-Infinity vs the same engine on one process: latents differ by at most %.2e",
                    args.ranks, same)
    vi, ind = results["video_infinity"]["summary"], results["independent"]["summary"]
    ordering = vi["mad_ratio"] < ind["mad_ratio"] and vi["mad_border"] < ind["mad_border"]
    logger.info("expected ordering (Video-Infinity's border MAD ratio %.2f < independent clips' %.2f): %s%s",
                vi["mad_ratio"], ind["mad_ratio"], "holds" if ordering else "does NOT hold",
                "" if trained else " -- random model, not meaningful")
    plot = RESULTS / "quality.png"
    RESULTS.mkdir(exist_ok=True)
    _plot(results, borders, plot)
    logger.info("plot: %s", plot.relative_to(RESULTS.parent.parent))
    write_result("quality", {
        "machine": info, "model": model, "model_note": model_note, "trained_demo_model": shipped, "frames": args.frames, "ranks": args.ranks,
        "borders": borders, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
        "seeds": seeds, "engine": args.engine, "one_process_vs_ranks_max_abs_latent_diff": same,
        "expected_ordering_holds": ordering, "results": results, "plot": "quality.png",
    }, MEASURES)


if __name__ == "__main__":
    main()
