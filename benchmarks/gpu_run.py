"""A whole Wan2.1-1.3B-size generation on one CUDA GPU through the command line, against its plan.

Issue 24 item 3 asks the plan to be checked against a GPU whenever one is there; ``one_gpu.py --gpu``
checks the transformer call, this checks a whole run: prompt encoding (the UMT5-XXL encoder), the
denoising steps and the VAE decode into the MP4, as ``video-infinity generate`` runs them on one GPU.

It builds a ``WanPipeline`` folder with random weights from ``examples/model_configs/Wan2.1-T2V-1.3B``'s
configs (stored in bf16 but diffusers' float32 modules, the VAE in float32; a run loads them in its dtype; the tokenizer
is the embedded ``demo-wan`` model's word-level one, since the real vocabulary cannot be downloaded
here), then for each ``--frames``: ``video-infinity plan --json`` and ``video-infinity generate`` on one
GPU (480x832, ``--steps`` steps, guidance 5, the ``wan`` preset, bf16, the engine's GPU defaults), and
records the plan's rank-0 peak beside the run's (the sidecar's ``peak_memory_bytes``:
``max_memory_allocated`` over the whole run) and the run's seconds per stage. Random weights make noise,
not a video: the figures are memory and time only.

``--smoke``: the same on CPU with every width of the configs cut (a check of the script; writes nothing).

Needs PyAV where it runs (the CLI writes the MP4). The lent H200 machine has none, and its wheel
(about 35 MB, FFmpeg inside), this tree (about 28 MB) and the wheels of diffusers and pydantic (about
10 MB) come to about 73 MB, over the device's 64 MiB transfer: as is, it runs on a GPU machine with
this package installed, not on that one.

    python benchmarks/gpu_run.py [--frames 81 321] [--steps 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import PIPELINE, ROOT, WAN_ENGINE, machine, setup_logging, write_result
from _gpu import cast_as_loaded, copy_labels, parse_gpu_args

logger = logging.getLogger("gpu_run")
MEASURES = (*WAN_ENGINE, *PIPELINE, "src/video_infinity/plan.py", "src/video_infinity/run", "src/video_infinity/cli.py")

CONFIGS = ROOT / "examples" / "model_configs" / "Wan2.1-T2V-1.3B"
TOKENIZER = ROOT / "src" / "video_infinity" / "demo" / "weights_wan" / "tokenizer"
SMOKE = {
    "transformer": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=16, num_layers=2),
    "text_encoder": dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1, num_decoder_layers=1),
    "vae": dict(base_dim=8),
}
"""``--smoke``: every width cut (the text encoder's width is the transformer's ``text_dim``)."""


def _config(component: str, smoke: bool) -> dict[str, Any]:
    config = json.loads((CONFIGS / component / "config.json").read_text())
    return {**config, **(SMOKE.get(component, {}) if smoke else {})}


def build_folder(folder: Path, smoke: bool) -> Path:
    """A WanPipeline folder with random weights in the configs' shapes (on the GPU to be quick)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    device = "cpu" if smoke else "cuda"
    bf16 = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        transformer = WanTransformer3DModel.from_config(_config("transformer", smoke))
    cast_as_loaded(transformer, bf16).save_pretrained(folder / "transformer")
    del transformer
    text = _config("text_encoder", smoke)
    with torch.device(device):
        encoder = UMT5EncoderModel(UMT5Config(**{k: v for k, v in text.items() if k != "architectures"}))
    encoder.to(bf16).save_pretrained(folder / "text_encoder")
    del encoder
    with torch.device(device):
        vae = AutoencoderKLWan.from_config(_config("vae", smoke))
    vae.save_pretrained(folder / "vae")
    del vae
    if device == "cuda":
        torch.cuda.empty_cache()
    shutil.copytree(CONFIGS / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    shutil.copytree(TOKENIZER, folder / "tokenizer", dirs_exist_ok=True)
    # demo-wan's index: the same WanPipeline components, its tokenizer class the one saved beside it
    shutil.copy(TOKENIZER.parent / "model_index.json", folder / "model_index.json")
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "video_infinity.cli", *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def one_run(folder: Path, out: Path, frames: int, steps: int, smoke: bool) -> dict[str, Any]:
    height, width = (32, 32) if smoke else (480, 832)
    run = ["--model", str(folder), "--dtype", "float32" if smoke else "bfloat16", "--devices", "1" if smoke else "gpu:0",
           "--seed", "0", "--base-path", str(out), "--prompt", "a red circle moving right", "--num-frames", str(frames),
           "--num-inference-steps", str(steps), "--guidance-scale", "5", "--height", str(height), "--width", str(width),
           "--file-name", f"run_{frames}", "--scheduler", "model", "--engine", "wan"]
    planned = _cli("plan", *run, "--json", *([] if smoke else ["--gpu-memory", "139GiB"]))
    if planned.returncode:
        raise RuntimeError(f"plan failed: {planned.stderr.strip()[-2000:]}")
    plan = json.loads(planned.stdout)
    done = _cli("generate", *run, "--overwrite")
    if done.returncode:
        raise RuntimeError(f"generate failed: {done.stderr.strip()[-2000:]}")
    sidecar = json.loads((out / f"run_{frames}.json").read_text())
    measured = int(sidecar["peak_memory_bytes"][0])
    rank0 = plan["ranks"][0]
    return {"frames": frames, "latent_frames": plan["latent_frames"], "steps": steps, "height": height,
            "width": width, "planned_peak_bytes": rank0["peak_bytes"],
            "planned_stages": {s["name"]: s["peak_bytes"] for s in rank0["stages"]},
            "measured_peak_bytes": measured,
            "measured_over_planned": round(measured / rank0["peak_bytes"], 4) if not smoke else None,
            "seconds": sidecar.get("seconds"), "plan": plan}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[81], help="video frames per run (4k+1)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="where the model folder and the videos go "
                        "(default: a temporary folder, removed)")
    args = parse_gpu_args(parser)
    setup_logging()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_run_"))
    try:
        folder = build_folder(work / "model", args.smoke)
        rows = []
        for frames in ([9] if args.smoke else args.frames):
            row = one_run(folder, work / "out", frames, args.steps, args.smoke)
            rows.append(row)
            logger.info("%d frames: planned peak %.2f GiB (%s), measured %.2f GiB; seconds %s", frames,
                        row["planned_peak_bytes"] / 2**30,
                        ", ".join(f"{k} {v / 2**30:.2f}" for k, v in row["planned_stages"].items()),
                        row["measured_peak_bytes"] / 2**30, row["seconds"])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.smoke:
        logger.info("smoke run: nothing written")
        return 0
    info = machine()
    labels = copy_labels(args.commit, info.get("gpu"), "gpu_run.py")
    write_result("gpu_run", {
        "what": "a whole Wan2.1-1.3B-size generation (random weights) through video-infinity generate on one GPU: "
                "the plan's rank-0 peak against the run's max_memory_allocated, and the run's seconds",
        "machine": info, "rows": rows}, MEASURES, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
