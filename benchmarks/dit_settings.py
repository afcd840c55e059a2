"""The DiT engine's long-video settings, measured on the trained Wan demo model.

Every video is made by ``video_infinity.VideoInfinityPipeline`` on one process (the engine gives the
same video on any number of ranks, so one process shows what N ranks would), from the same per-frame
initial noise for every setting. Seed i prompts ``EVAL_PROMPTS[i % 8]`` (each colour and each
direction twice in 8 seeds). Per setting and length, averaged over the seeds:

* prompt following per segment: the video cut into 32-frame segments, each judged alone by the demo
  probe (colour, and direction from the object's median step): the share of segments right;
* object continuity: the share of frames in which the probe finds the object;
* the largest step of the object anywhere / its median step (a jump anywhere in the video), and the
  same at the borders of a 2-rank and a 4-rank split (the engine's result does not depend on the
  split; these are where a naive split would break);
* motion: the object's median step (pixels per frame; the shipped model's last training clips move 2) and the mean absolute
  change between consecutive frames (0..255): a frozen video scores ~0 on both, however continuous;
* wall time per video (this machine, one process).

    python benchmarks/dit_settings.py [--model demo-wan] [--seeds 8] [--frames 129 257] [--steps 20]
        [--settings NAME ...] [--out NAME]
    python benchmarks/dit_settings.py --merge results/A.json results/B.json --out dit_settings

(Two processes with one thread each, each given half the settings and its own ``--out``, use two cores;
``--merge`` then writes one result and prints the table.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Any

import numpy as np

from _common import PIPELINE, PROBE, WAN_ENGINE, command_line, machine, setup_logging, write_result

logger = logging.getLogger("dit_settings")
MEASURES = (*(m for m in WAN_ENGINE if m != "src/video_infinity/presets.py"), *PIPELINE, *PROBE,
            "src/video_infinity/demo/__init__.py", "src/video_infinity/demo/data.py", "src/video_infinity/demo/weights_wan")
"""The Wan engine and pipeline, the probe that judges the videos, and the trained demo-wan weights; not
the presets: every setting compared is spelled out below (the ``wan`` preset is chosen from this result)."""
LABELS = ("commit", "written", "command", "machine", "environment", "measures", "uncommitted_measures")
"""A result's label fields (``_common.write_result``)."""

WAN = {"padding": 8, "top_k": 4}
SETTINGS: dict[str, dict[str, Any]] = {
    "wan": {"attn": dict(WAN)},
    "wan + rotary_clip 8": {"attn": {**WAN, "rotary_clip": 8}},
    "wan + rotating globals": {"attn": {**WAN, "global_frames": "rotating"}},
    "wan + rotary_clip 8 + rotating": {"attn": {**WAN, "rotary_clip": 8, "global_frames": "rotating"}},
    "local only (top_k 0)": {"attn": {**WAN, "top_k": 0}},
    "padding 4 (trained window)": {"attn": {**WAN, "padding": 4}},
}
"""Engine settings compared (``rotary_clip`` 8: the largest temporal distance in the demo model's
training windows of up to 9 latent frames)."""
SEGMENT = 32


def latent_borders(frames: int, ranks: int, temporal: int = 4) -> list[int]:
    """Video frames where rank clips start when ``frames`` (1 + temporal * n) are split in latent frames."""
    from video_infinity.frames import partition_frames

    latent = (frames - 1) // temporal + 1
    return [1 + temporal * (part.start - 1) for part in partition_frames(latent, ranks)[1:]]


def measure(video: np.ndarray, colour: str, direction: str) -> dict[str, Any]:
    from video_infinity.demo.probe import analyse, steps, track

    n, height, width, _ = video.shape
    report = analyse(video)
    segments = [analyse(video[s:s + SEGMENT]) for s in range(0, n - SEGMENT // 2, SEGMENT)]
    centres = track(video)
    d = np.hypot(*steps(centres, width, height).T)
    finite = d[np.isfinite(d)]
    median = float(np.median(finite)) if len(finite) else math.nan

    def border_ratio(ranks: int) -> float | None:
        jumps = [d[b - 1] for b in latent_borders(n, ranks) if math.isfinite(d[b - 1])]
        return float(max(jumps) / max(median, 1e-6)) if jumps and math.isfinite(median) else None

    change = np.abs(np.diff(video.astype(np.float32), axis=0)).mean()
    return {
        "colour_ok": [s.colour == colour for s in segments],
        "direction_ok": [s.direction == direction for s in segments],
        "found": report.found_frames / n,
        "max_step_ratio": float(finite.max() / max(median, 1e-6)) if len(finite) and math.isfinite(median) else None,
        "border_ratio_2": border_ratio(2),
        "border_ratio_4": border_ratio(4),
        "median_step": median,
        "frame_change": float(change),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
        return round(float(np.mean(values)), 4) if values else None

    return {
        "colour_per_segment": round(float(np.mean([ok for r in rows for ok in r["colour_ok"]])), 4),
        "direction_per_segment": round(float(np.mean([ok for r in rows for ok in r["direction_ok"]])), 4),
        "found": mean("found"),
        "max_step_ratio": mean("max_step_ratio"),
        "border_ratio_2": mean("border_ratio_2"),
        "border_ratio_4": mean("border_ratio_4"),
        "median_step": mean("median_step"),
        "moving": round(float(np.mean([r["median_step"] >= 1.0 for r in rows])), 4),
        "frame_change": mean("frame_change"),
        "seconds_per_video": mean("seconds"),
    }


COLUMNS = (("colour_per_segment", "colour", "{:.0%}"), ("direction_per_segment", "direction", "{:.0%}"),
           ("found", "object found", "{:.0%}"), ("max_step_ratio", "largest step / median", "{:.2f}"),
           ("border_ratio_2", "2-rank border / median", "{:.2f}"), ("median_step", "median step px", "{:.2f}"),
           ("moving", "moving", "{:.0%}"), ("frame_change", "frame change", "{:.2f}"),
           ("seconds_per_video", "s / video", "{:.1f}"))


def table(results: dict[str, Any]) -> str:
    """The comparison as a markdown table, a row per length and setting."""
    lines = ["| frames | setting | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for frames, settings in results.items():
        for name, entry in settings.items():
            cells = ["-" if entry["summary"][key] is None else fmt.format(entry["summary"][key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {frames} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(parts: list[str], out: str) -> None:
    """One result from several runs' JSON files (their settings and lengths combined; the parts removed)."""
    from pathlib import Path

    loaded = [json.loads(Path(p).read_text()) for p in parts]
    commits = {part.get("commit") for part in loaded}
    if len(commits) != 1:
        raise SystemExit(f"--merge: the parts were measured at different commits {sorted(map(str, commits))}")
    merged = {k: v for k, v in loaded[0].items() if k not in ("results", "settings", "load_average_at_end", *LABELS)}
    merged["parts"] = [{k: part.get(k) for k in ("command", "written", "commit", "load_average_at_end")}
                       for part in loaded]
    # The figures were measured by the parts: the merged file carries their commit and machine, the
    # latest part's time, and every file any part measured.
    labels = {k: loaded[0].get(k) for k in LABELS}
    labels["written"] = max(str(part.get("written")) for part in loaded)
    labels["command"] = "; ".join(str(part.get("command")) for part in loaded) + "; then " + command_line()
    labels["measures"] = sorted({m for part in loaded for m in part.get("measures") or []})
    labels["uncommitted_measures"] = sorted({m for part in loaded for m in part.get("uncommitted_measures") or []})
    merged["settings"], merged["results"] = {}, {}
    for part in loaded:
        merged["settings"].update(part["settings"])
        for frames, settings in part["results"].items():
            merged["results"].setdefault(frames, {}).update(settings)
    order = list(SETTINGS)
    merged["results"] = {frames: dict(sorted(s.items(), key=lambda kv: order.index(kv[0])))
                         for frames, s in sorted(merged["results"].items(), key=lambda kv: int(kv[0]))}
    write_result(out, merged, MEASURES, labels=labels)
    for p in parts:
        Path(p).unlink()
    print(table(merged["results"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-wan")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--frames", type=int, nargs="+", default=[129, 257])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default="dit_settings")
    parser.add_argument("--merge", nargs="+", default=None, help="combine these result files into --out instead")
    args = parser.parse_args()
    setup_logging()
    if args.merge:
        merge(args.merge, args.out)
        return
    import torch

    from video_infinity import VideoInfinityPipeline
    from video_infinity.demo import data
    from video_infinity.demo.train import EVAL_PROMPTS

    loaded = VideoInfinityPipeline.from_pretrained(args.model)
    results: dict[str, Any] = {}
    for frames in args.frames:
        for name in args.settings:
            pipe = VideoInfinityPipeline(loaded.family, SETTINGS[name])
            rows = []
            for seed in range(args.seeds):
                colour, shape, direction = EVAL_PROMPTS[seed % len(EVAL_PROMPTS)]
                start = time.perf_counter()
                with torch.no_grad():
                    video = pipe(data.caption(colour, shape, direction), num_frames=frames, height=data.SIZE,
                                 width=data.SIZE, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                 seed=seed, progress=False).frames[0]
                row = measure((video * 255).round().astype(np.uint8), colour, direction)
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
            summary = summarise(rows)
            results.setdefault(str(frames), {})[name] = {"summary": summary, "videos": rows}
            logger.info("%d frames  %-32s %s", frames, name, summary)
    write_result(args.out, {
        "what": "DiT engine settings on the trained Wan demo model, one process, per-frame noise of seeds 0..n-1",
        "model": str(args.model), "settings": {k: SETTINGS[k] for k in args.settings}, "seeds": args.seeds,
        "steps": args.steps, "guidance_scale": args.guidance, "segment_frames": SEGMENT,
        "machine": machine(), "results": results,
    }, MEASURES)
    print(table(results))


if __name__ == "__main__":
    main()
