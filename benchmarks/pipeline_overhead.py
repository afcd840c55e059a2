"""The pipeline's own cost: ``VideoInfinityPipeline`` vs calling the engine's sampling loop directly.

Same model (the embedded demo model by default), same engine settings, same text embeddings, initial
latents and sampler, one process on CPU, timed side by side in one run (variants interleaved, order
rotated each round; ratio = median of per-round ratios):
  * ``direct``: ``parallelize(unet, engine)`` + ``video_infinity.denoise.denoise`` on precomputed text
    embeddings and latents (the UNet loop a user would write by hand), then ``handle.remove()``;
  * ``pipeline_latents``: ``pipe(prompt, ..., output_type="latent")``: argument checks, prompt encoding,
    per-frame initial noise, the same loop, the gather to rank 0 (a no-op on one process);
  * ``pipeline_generate``: ``pipe.generate_latents`` (what the CLI's ranks call) on the same latents.
Both pipeline variants must give the same latents as ``direct`` (checked, bit for bit).

    python benchmarks/pipeline_overhead.py [--frames 8] [--steps 3] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging

from _common import DEMO_MODEL, PIPELINE, UNET3D_ENGINE, interleaved, machine, paired_ratio, setup_logging, write_result

logger = logging.getLogger("pipeline_overhead")
MEASURES = (*UNET3D_ENGINE, *PIPELINE, *DEMO_MODEL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    import torch

    from video_infinity import ClipContext, VideoInfinityPipeline, parallelize
    from video_infinity.demo import data
    from video_infinity.families.unet3d.family import denoise

    torch.set_num_threads(args.threads)
    pipe = VideoInfinityPipeline.from_pretrained(args.model, device="cpu")
    prompt, seed, guidance, size = "a red circle moving right", 3, 5.0, data.SIZE
    common = dict(num_frames=args.frames, height=size, width=size, num_inference_steps=args.steps,
                  guidance_scale=guidance, scheduler="ddim", seed=seed, progress=False)
    request = pipe.check_inputs(prompt, num_frames=args.frames, height=size, width=size,
                                num_inference_steps=args.steps, guidance_scale=guidance)
    ctx = ClipContext(total_frames=args.frames)
    text = pipe.family.encode_prompts([prompt])
    negative = pipe.family.encode_prompts([""])
    unet = pipe.family.model
    results: dict[str, torch.Tensor] = {}

    def direct() -> None:
        scheduler = pipe.make_scheduler("ddim")
        latents = pipe.initial_latents(request, ctx, scheduler, seed)
        handle = parallelize(unet, pipe.engine, ClipContext())
        try:
            with torch.no_grad():
                results["direct"] = denoise(unet, scheduler, latents, text, negative_embeds=negative,
                                            guidance_scale=guidance, seed=seed, frames=range(args.frames),
                                            num_steps=args.steps)
        finally:
            handle.remove()

    def pipeline_latents() -> None:
        results["pipeline_latents"] = pipe(prompt, output_type="latent", **common).frames

    def pipeline_generate() -> None:
        scheduler = pipe.make_scheduler("ddim")
        latents = pipe.initial_latents(request, ctx, scheduler, seed)
        results["pipeline_generate"] = pipe.generate_latents(request, ctx, scheduler, latents, seed=seed)

    times = interleaved({"direct": direct, "pipeline_latents": pipeline_latents, "pipeline_generate": pipeline_generate},
                        repeats=args.repeats, on_round=lambda r: logger.info("round %d of %d done", r + 1, args.repeats))
    same = {name: bool(torch.equal(results[name], results["direct"])) for name in ("pipeline_latents", "pipeline_generate")}
    ratios = {name: paired_ratio(times[name], times["direct"]) for name in ("pipeline_latents", "pipeline_generate")}
    for name, seconds in times.items():
        logger.info("%-18s median %.3f s  %s", name, sorted(seconds)[len(seconds) // 2],
                    "" if name == "direct" else f"ratio to direct {ratios[name]:.3f}, same latents: {same[name]}")
    write_result("pipeline_overhead", {
        "machine": machine(), "model": str(args.model or "embedded demo model"), "frames": args.frames,
        "steps": args.steps, "threads": args.threads, "repeats": args.repeats, "size": size,
        "engine": pipe.engine.model_dump(mode="json"), "seconds": times, "ratio_to_direct": ratios,
        "same_latents_as_direct": same,
    }, MEASURES)


if __name__ == "__main__":
    main()
