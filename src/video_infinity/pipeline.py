"""``VideoInfinityPipeline``: a long video from text in one call, on one process or many.

    >>> pipe = VideoInfinityPipeline.from_pretrained()          # the embedded demo model
    >>> video = pipe({0: "a red circle moving right", 32: "a green square moving up"},
    ...              num_frames=64, height=64, width=64, num_inference_steps=20, guidance_scale=5.0,
    ...              seed=1).frames[0]                            # float32 (64, 64, 64, 3) in [0, 1]

Call conventions follow diffusers' text-to-video pipelines (``num_frames`` of the whole video,
``output_type``, ``callback_on_step_end``, ``.frames[0]``). In a ``torch.distributed`` job every
rank calls the pipeline with the same arguments; each denoises its own clip of the video with
Video-Infinity's engine, and rank 0 receives the whole video (the other ranks get ``None`` for
``frames``). The same seed gives the same video on any number of ranks.

Everything runs through :meth:`VideoInfinityPipeline.generate_latents` (text, the engine, the one
sampling loop of :mod:`video_infinity.denoise`, checkpoints) and :meth:`VideoInfinityPipeline.stream_frames`
(decode, gather on rank 0): the CLI, the demo scripts and the benchmarks call those too. The
model-specific parts come from a family (:mod:`video_infinity.families`); checkpoints and resume
from :mod:`video_infinity.checkpoint`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .checkpoint import (
    FILE_NAME,
    CheckpointSpec,
    ResumePoint,
    agreed,
    fingerprint,
    load_checkpoint,
    mismatch,
    model_identity,
    saved_fingerprint,
    step_saver,
)
from .config import EngineConfig, rotary_clip_refusal
from .context import ClipContext
from .denoise import StepEnd, StopSampling, sample
from .families import family_from_pipe, load_family
from .families.base import Conditioning, ImageInputs, ModelFamily
from .engine.comm import comm_device, gather_frames, stream_to_rank0
from .errors import CheckpointError
from .images import load_image, load_video
from .noise import INITIAL, frame_noise
from .parallel import parallelize
from .presets import resolve_engine
from .prompts import Prompt, frame_embeddings, prompt_mix
from .request import GenerationRequest
from .schedulers import make_scheduler

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")

__all__ = ["GenerationRequest", "OUTPUT_TYPES", "VideoInfinityPipeline", "VideoInfinityPipelineOutput"]


@dataclass
class VideoInfinityPipelineOutput(BaseOutput):
    """``frames[0]`` is the video on rank 0 (see ``output_type``); ``None`` on the other ranks."""

    frames: Any


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _latent_index(family: ModelFamily, video_frame: int) -> int:
    """The latent frame whose decoded frames hold ``video_frame`` (the same index for UNet3D)."""
    latent = 0
    while family.video_frames(latent + 1) <= video_frame:
        latent += 1
    return latent


class VideoInfinityPipeline:
    """Text to long video with a diffusers text-to-video model and Video-Infinity's engine."""

    def __init__(self, family: ModelFamily, engine: EngineConfig | dict | str | None = None) -> None:
        self.family = family
        self.engine = resolve_engine(engine)
        self._interrupt = False
        self._model_files: tuple[str, str | None, str | None] | None = None
        """``from_pretrained``'s model, base_model and motion_adapter: what a checkpoint's fingerprint hashes."""
        self._model_parts: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        base_model: str | os.PathLike[str] | None = None,
        motion_adapter: str | os.PathLike[str] | None = None,
        engine: EngineConfig | dict | str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> VideoInfinityPipeline:
        """Load a model: ``None`` or ``"demo"`` is the embedded demo model, ``"demo-wan"`` the embedded
        Wan one (:data:`video_infinity.demo.EMBEDDED_MODELS`); else a diffusers folder or hub id (a
        UNet-only VideoCrafter2 folder takes the other components from ``base_model``; an AnimateDiff
        pipeline folder loads as is).

        ``motion_adapter``: an AnimateDiff ``MotionAdapter`` folder, put on the Stable Diffusion 1.5
        pipeline at ``base_model`` (or ``model``; give one of the two).

        ``engine``: an :class:`EngineConfig`, the original's ``plugin_configs`` dict or a preset name
        from :data:`video_infinity.presets.PRESETS` (e.g. ``"wan"``) (default: the published settings). ``device``: default ``cuda:$LOCAL_RANK`` when there is a GPU, else CPU.
        ``torch_dtype``: default float32.
        """
        engine = resolve_engine(engine)
        if motion_adapter is not None:
            if model is not None and base_model is not None and str(model) != str(base_model):
                raise ValueError("motion_adapter: give its Stable Diffusion base as base_model or as model, not both")
            if model is None and base_model is None:
                raise ValueError("motion_adapter: also give the Stable Diffusion 1.5 pipeline it extends (base_model)")
        device = torch.device(device) if device is not None else _default_device()
        base = None if base_model is None else str(base_model)
        adapter = None if motion_adapter is None else str(motion_adapter)
        if motion_adapter is not None:
            sd_base = str(base if base is not None else model)
            # The adapter folder is the model; its Stable Diffusion base gives the other components.
            pipe = cls(load_family(str(motion_adapter), sd_base, torch_dtype or torch.float32, device,
                                   family="animatediff"), engine)
        else:
            from .demo import resolve_model

            model = resolve_model(model)  # None or an embedded model's name ("demo", "demo-wan"): its folder
            pipe = cls(load_family(str(model), base, torch_dtype or torch.float32, device), engine)
        pipe._model_files = (str(model if model is not None else base), base, adapter)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: Any, engine: EngineConfig | dict | str | None = None) -> VideoInfinityPipeline:
        """Reuse a loaded diffusers pipeline's components (the same modules, no copy): a text-to-video
        pipeline, or Wan's ``WanImageToVideoPipeline`` (then call with ``image=``)."""
        return cls(family_from_pipe(pipeline), engine)

    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in ``callback_on_step_end`` to stop after that step (diffusers' way)."""
        return self._interrupt

    # ------------------------------------------------------------------------------------------
    # Checks

    def check_inputs(self, prompt: GenerationRequest | Prompt, *, world_size: int = 1,
                     **values: Any) -> GenerationRequest:
        """The checked request: ``prompt`` with ``values`` (``num_frames=...``, the call's keywords)
        through :class:`GenerationRequest`, or a request as is; then what the request's own checks
        cannot know: this model's size multiple and frame count (Wan: 16 pixels, 4n + 1 frames),
        and one frame at least per rank. One-line ValueErrors naming the field, before any model work."""
        request = prompt if isinstance(prompt, GenerationRequest) else GenerationRequest.checked(prompt=prompt, **values)
        self.checked_images(request, world_size=world_size)
        return request

    def checked_images(self, request: GenerationRequest, *, world_size: int = 1) -> ImageInputs:
        """``check_inputs`` for a request, returning its images as read and checked: passed on to
        :meth:`generate_latents` (``images=``), files (a video above all) are decoded once per call."""
        multiple = self.family.spatial_multiple
        for name in ("height", "width"):
            if getattr(request, name) % multiple:
                raise ValueError(f"{name}: must be a positive multiple of {multiple}, got {getattr(request, name)!r}")
        latent_frames = self.latent_frames(request)
        if latent_frames < world_size:
            raise ValueError(f"num_frames: {request.num_frames} frames ({latent_frames} latent frames) cannot be split "
                             f"over {world_size} ranks (give every rank at least one frame)")
        engine = request.engine_for(self.engine)
        if engine.attn.rotary_clip is not None and not self.family.rotary_positions:
            raise ValueError(rotary_clip_refusal(self.family.name))
        if engine.loop and not self.family.supports_loop:
            raise ValueError(f"loop: the {self.family.name} family does not make loops (its temporal windows do not "
                             "wrap around the video); set loop to false")
        images = self.load_images(request)
        if self.family.image_mode is not None:
            self.family.check_images(images, request.num_frames)
        elif images:
            name = next(n for n in ("image", "video", "last_image") if getattr(images, n) is not None)
            raise ValueError(f"{name}: the {self.family.name} family makes video from text only; leave {name} out")
        return images

    @staticmethod
    def load_images(request: GenerationRequest) -> ImageInputs:
        """The request's images, read (paths decoded; in-memory ones as given); one-line ValueErrors."""
        return ImageInputs(image=load_image(request.image, "image"),
                           last_image=load_image(request.last_image, "last_image"),
                           video=load_video(request.video, "video"))

    def latent_frames(self, request: GenerationRequest) -> int:
        """The model's frames for the request's video: the engine's time axis (Wan: latent frames)."""
        return self.family.latent_frames(request.num_frames)

    def make_scheduler(self, scheduler: str | Any | None) -> Any:
        """A scheduler object: a name from ``SCHEDULER_NAMES`` on the model's schedule, an object as
        is, or (None) the family's default sampler."""
        if scheduler is None or isinstance(scheduler, str):
            return make_scheduler(scheduler or self.family.default_scheduler, self.family.scheduler_config)
        return scheduler

    # ------------------------------------------------------------------------------------------
    # The steps under __call__ (also what the CLI's ranks run)

    def conditioning(self, request: GenerationRequest, ctx: ClipContext,
                     images: ImageInputs | None = None) -> Conditioning:
        """Text for this rank's frames: each frame's (blended) prompt embedding, and the negative one;
        image families add the request's ``images`` (read from the request when not given)."""
        family = self.family
        prompt = request.prompt
        if isinstance(prompt, Mapping):  # keyframes are video frames: move each to the latent frame decoded into it
            prompt = {_latent_index(family, k): p for k, p in sorted(prompt.items())}
        distinct, mixes = prompt_mix(prompt, self.latent_frames(request), ctx.frames, request.transition_frames,
                                     request.keyframe_mode)
        per_frame = frame_embeddings(family.encode_prompts(distinct, ctx), mixes)
        negative = family.encode_prompts([request.negative_prompt or ""], ctx) if request.guidance_scale > 1.0 else None
        cond = family.conditioning(per_frame, negative, request.guidance_scale, request.fps)
        if family.image_mode is not None:
            cond = family.condition_on_images(cond, images if images is not None else self.load_images(request), ctx,
                                              request.num_frames, request.height, request.width)
        return cond

    def initial_latents(self, request: GenerationRequest, ctx: ClipContext, scheduler: Any, seed: int,
                        latents: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """This rank's starting latents: its frames of ``latents`` (the whole video's, as diffusers
        takes them), of ``generator``'s draw of the whole video, or per-frame noise from ``seed``;
        times the scheduler's ``init_noise_sigma``."""
        family = self.family
        shape = (1, *family.latent_shape(request.height, request.width))
        whole = (1, shape[1], self.latent_frames(request), *shape[2:])
        own = slice(ctx.frames.start, ctx.frames.stop)
        if latents is not None:
            if tuple(latents.shape) != whole:
                raise ValueError(f"latents: expected the whole video's initial latents of shape {whole}, "
                                 f"got {tuple(latents.shape)}")
            noise = latents[:, :, own]
        elif generator is not None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(whole, generator=generator, device=generator.device, dtype=torch.float32)[:, :, own]
        else:
            noise = frame_noise(seed, ctx.frames, shape, INITIAL, torch.float32, "cpu")
        return noise.to(family.device, family.dtype) * scheduler.init_noise_sigma

    def generate_latents(
        self,
        request: GenerationRequest,
        ctx: ClipContext,
        scheduler: Any,
        latents: torch.Tensor,
        *,
        seed: int,
        start_step: int = 0,
        restore_scheduler: Callable[[Any], None] | None = None,
        on_step_end: StepEnd | None = None,
        engine: EngineConfig | None = None,
        checkpoint: CheckpointSpec | None = None,
        on_step_done: Callable[[int], None] | None = None,
        images: ImageInputs | None = None,
    ) -> torch.Tensor:
        """Denoise this rank's ``latents`` (from ``initial_latents`` or a checkpoint) with the engine on.

        ``seed`` draws the per-frame noise of stochastic samplers; ``start_step`` / ``restore_scheduler``
        continue a run (from a :class:`~video_infinity.checkpoint.ResumePoint`: its ``step``, ``restore``
        and ``latents``); ``on_step_end`` as in :func:`video_infinity.denoise.sample`; ``engine``: this
        call's engine settings (default: the pipeline's). ``checkpoint``: save the denoising state to
        ``checkpoint.path`` every ``checkpoint.every`` steps (every rank calls, rank 0 writes), after
        ``on_step_end`` so that latents it replaced are the ones saved; a step whose ``on_step_end``
        raises is not saved, and the last checkpoint stays. ``on_step_done(index)``: after step
        ``index`` and its checkpoint (progress reports: a stop from then on keeps this step). ``images``:
        the request's images as :meth:`checked_images` returned them (read again when not given).
        """
        step_end = on_step_end
        if checkpoint is not None or on_step_done is not None:
            save = step_saver(checkpoint, ctx, latents.device, request.num_inference_steps) if checkpoint else None

            def saving_step_end(index: int, t: torch.Tensor, current: torch.Tensor,
                                scheduler: Any) -> torch.Tensor | None:
                stop: StopSampling | None = None
                replaced = None
                if on_step_end is not None:
                    try:
                        replaced = on_step_end(index, t, current, scheduler)
                    except StopSampling as exc:  # a stop after this step: the step itself is done, save it
                        stop, replaced = exc, exc.latents
                if save is not None:
                    save(index, current if replaced is None else replaced, scheduler)
                if on_step_done is not None:
                    on_step_done(index)
                if stop is not None:
                    raise stop
                return replaced

            step_end = saving_step_end

        cond = self.conditioning(request, ctx, images)
        handles = [parallelize(model, engine or self.engine, ctx) for model in self.family.denoisers]

        def step_start(index: int) -> None:
            # Every expert learns the step's index from the loop (not by counting its own calls), so
            # rotating global frames are those of the step, also after a resume.
            for handle in handles:
                handle.set_step(index)

        try:
            with torch.no_grad():
                latents = sample(lambda x, t: self.family.predict_noise(x, t, cond), scheduler, latents, seed=seed,
                                 frames=ctx.frames, num_steps=request.num_inference_steps, eta=request.eta,
                                 start_step=start_step, restore_scheduler=restore_scheduler, on_step_end=step_end,
                                 on_step_start=step_start)
        finally:
            for handle in handles:
                handle.remove()
        return latents if self.family.image_mode is None else self.family.finish_latents(latents, cond)

    # ------------------------------------------------------------------------------------------
    # Checkpoints (the mechanism of ``__call__``'s checkpoint_dir / resume and of the CLI's --resume)

    def checkpoint_fingerprint(self, request: GenerationRequest, *, seed: int, scheduler: str | Any | None = None,
                               engine: EngineConfig | None = None, noise: str = "seed") -> dict[str, Any]:
        """What determines this request's latents (:func:`video_infinity.checkpoint.fingerprint`):
        the model's files, ``seed``, ``noise`` (where the initial noise came from), the compute dtype,
        the request, ``scheduler`` as asked for (a name, None, or an object: its class and config) and
        the engine settings (default: the pipeline's)."""
        if scheduler is not None and not isinstance(scheduler, str):
            scheduler = {"class": type(scheduler).__name__, "config": dict(scheduler.config)}
        return fingerprint(request, model=self._model_identity(), seed=seed, noise=noise,
                           dtype=str(self.family.dtype).removeprefix("torch."), scheduler=scheduler,
                           engine=(engine or self.engine).model_dump(mode="json"))

    def read_checkpoint(self, path: str | os.PathLike[str], ctx: ClipContext, *, label: str | None = None,
                        missing_ok: bool = False) -> dict[str, Any] | None:
        """A checkpoint file, read by rank 0 and shared with every rank (only rank 0 needs to see it);
        None when it does not exist and ``missing_ok``. One-line CheckpointError on every rank if it
        cannot be used."""
        path = Path(path)

        def read() -> dict[str, Any] | None:
            if missing_ok and not path.exists():
                return None
            return load_checkpoint(path, label)

        return agreed(read, ctx, self.device)

    def resume_point(self, data: dict[str, Any], parts: dict[str, Any], ctx: ClipContext, *,
                     label: str) -> ResumePoint:
        """This rank's part of checkpoint ``data`` (from :meth:`read_checkpoint`), refused with one
        line naming what differs unless it was saved by a call with the fingerprint ``parts``."""
        differ = mismatch(data, parts)
        if differ:
            raise CheckpointError(f"{label}: saved by a call with other arguments or another model (differs in: "
                                  f"{', '.join(differ)}); call with the arguments it was saved with, or remove it "
                                  "to start over")
        return ResumePoint.take(data, ctx, self.device, self.family.dtype)

    def _model_identity(self) -> dict[str, Any]:
        """The fingerprint's model parts, computed once: ``from_pretrained``'s folders' files; for
        ``from_pipe`` (no folder known to match the modules) the pipeline's name and a sample of
        every denoiser weight."""
        if self._model_parts is None:
            if self._model_files is not None:
                self._model_parts = model_identity(*self._model_files)
            else:
                digest = hashlib.sha256()
                for model in self.family.denoisers:
                    for name, weight in model.named_parameters():
                        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
                    sample_values = [w.detach().flatten()[:8].float() for w in model.parameters()]
                    if sample_values:
                        digest.update(torch.cat(sample_values).cpu().numpy().tobytes())
                self._model_parts = {"model": f"pipe:{self.family.source}:{digest.hexdigest()}"}
        return self._model_parts

    def stream_frames(self, latents: torch.Tensor, ctx: ClipContext, *, uint8: bool = False) -> Iterator[torch.Tensor]:
        """Decode every rank's latents; rank 0 iterates over the whole video's frames in order, chunk by
        chunk (float (n, H, W, 3) in [0, 1], or uint8 with ``uint8``), the others only send theirs."""
        split_invariant = self.engine.split_invariant_on(latents.device.type)
        chunks: Iterator[torch.Tensor] = self.family.decode(latents, split_invariant, ctx)
        if uint8:
            chunks = ((c * 255).round().to(torch.uint8) for c in chunks)
        yield from stream_to_rank0(chunks, ctx, latents.device, torch.uint8 if uint8 else torch.float32)

    # ------------------------------------------------------------------------------------------
    # The call

    def __call__(
        self,
        prompt: Prompt,
        *,
        image: Any = None,
        last_image: Any = None,
        video: Any = None,
        negative_prompt: str | None = None,
        num_frames: int,
        height: int,
        width: int,
        num_inference_steps: int = 30,
        guidance_scale: float = 12.0,
        fps: int | None = None,
        scheduler: str | Any | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        context: ClipContext | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable[[VideoInfinityPipeline, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
        progress: bool = True,
        return_dict: bool = True,
        eta: float = 0.0,
        transition_frames: int = 0,
        keyframe_mode: str = "interpolate",
        loop: bool | None = None,
        engine: EngineConfig | dict | str | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ) -> VideoInfinityPipelineOutput | tuple[Any]:
        """Make a video of ``num_frames`` frames (the whole video, on however many ranks).

        ``prompt``: a string, a list (consecutive segments of equal length, blended over
        ``transition_frames``) or FreeNoise's ``{start_frame: prompt}`` dict (frame 0 required;
        embeddings blend linearly from one keyframe to the next; ``keyframe_mode="hold"``: each prompt
        holds from its frame, blended over ``transition_frames`` at each change). Image-to-video (Wan
        image-to-video and TI2V models), diffusers' keywords: ``image`` (the first frame: a PIL image, an
        array, a tensor or a path), ``last_image`` (the last frame: first-last-frame models, Wan2.2 A14B
        I2V); ``video``: continue given frames (a list of images, an (n, H, W, 3) array, a tensor or a
        video file), which become the video's first frames. ``scheduler``: a name
        (``model``: the folder's own, ``ddim``, ``dpmsolver++``, ``dpmsolver++-karras``,
        ``sde-dpmsolver++``, ``sde-dpmsolver++-karras``; default: the family's, ``sde-dpmsolver++``
        for UNet3D models, ``model`` for Wan) or a diffusers scheduler object (used as is). Noise: ``latents``
        (the whole video's, unscaled, as diffusers takes them), else ``generator`` (draws the whole
        video's noise as diffusers does), else per-frame noise from ``seed`` (default: random, shared
        by the ranks). ``context``: the frames this process owns (default: from ``torch.distributed``
        when it is initialised, else one process). ``output_type``: ``"np"`` (float32
        (frames, H, W, 3) in [0, 1]), ``"pil"`` (list of images), ``"pt"`` ((frames, 3, H, W)) or
        ``"latent"`` ((C, frames, h, w)), each as ``frames[0]``; other ranks get ``frames=None``.
        ``callback_on_step_end(pipe, step, timestep, {"latents": this rank's latents})`` may return
        replacement latents under ``"latents"`` and stop the run by setting ``pipe._interrupt = True``
        (every rank must do the same). ``eta``: DDIM's eta. ``loop``: a seamless loop (the frames on a
        ring, the last flowing into the first; see ``EngineConfig.loop``) for this call; default: the
        pipeline's engine setting. ``engine``: this call's engine settings (knobs, a preset's name or
        an :class:`EngineConfig`); default: the pipeline's. The generation parameters are checked by
        :class:`~video_infinity.request.GenerationRequest` (one-line ValueErrors naming the argument,
        before any model work). Writes no file, unless asked for checkpoints:

        ``checkpoint_dir``: a folder (seen by rank 0; created if needed) where the denoising state is
        saved as ``checkpoint.ckpt`` every ``checkpoint_every`` steps (default 1: every step), replaced
        atomically: the whole video's latents and the scheduler's state per latent frame, and the
        fingerprint of the call (model files, seed, noise, dtype, prompts, frames, size, steps,
        guidance, scheduler, engine settings). A call that completes removes it; a call stopped by an
        exception (e.g. raised in ``callback_on_step_end``, the exception propagates), by
        ``pipe._interrupt`` or by a crash keeps the last one. A call without ``resume`` refuses a
        folder that holds a checkpoint (an unfinished call's progress is never overwritten).

        ``resume=True``: continue from ``checkpoint_dir``'s checkpoint: only the remaining steps run,
        and the frames equal an uninterrupted call's bit for bit on CPU, on any number of ranks (saved
        on 2, resumed on 1 or 3). The call's arguments must be those it was saved with (a
        ``CheckpointError`` of one line names what differs); with ``seed=None`` (and no ``generator``
        or ``latents``) the checkpoint's seed is used. Without a checkpoint in the folder the call
        starts from the first step (logged), so re-running the same command after a crash just
        continues.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        named = scheduler is None or isinstance(scheduler, str)
        request = GenerationRequest.checked(
            prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, fps=fps, seed=seed,
            # A scheduler object is used as is, and takes eta as it does: the request checks names only.
            scheduler=scheduler if named else "ddim" if eta else None, eta=eta,
            transition_frames=transition_frames, keyframe_mode=keyframe_mode, loop=loop,
            engine=engine, image=image, last_image=last_image, video=video)
        if not named:
            request = request.model_copy(update={"scheduler": None})
        if checkpoint_dir is None and (resume or checkpoint_every is not None):
            raise ValueError(f"{'resume' if resume else 'checkpoint_every'}: needs checkpoint_dir (the folder of the "
                             "checkpoint)")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every: must be a positive integer, got {checkpoint_every!r}")
        world_size = context.world_size if context is not None else (dist.get_world_size() if dist.is_initialized() else 1)
        images = self.checked_images(request, world_size=world_size)
        engine = request.engine_for(self.engine)
        latent_frames = self.latent_frames(request)
        if context is None:
            context = ClipContext.from_process_group(latent_frames)
        elif context.total_frames is None:  # one process, length from the input: this video's
            context = ClipContext(total_frames=latent_frames)
        elif context.total_frames != latent_frames:
            raise ValueError(f"context: made for {context.total_frames} frames, but the video has "
                             f"{latent_frames} (latent) frames")
        asked_scheduler = scheduler
        scheduler = self.make_scheduler(scheduler)
        saved = self._existing_checkpoint(Path(checkpoint_dir), context, resume) if checkpoint_dir is not None else None
        if saved is not None and seed is None and generator is None and latents is None:
            seed = saved_fingerprint(saved).get("seed")  # a rerun of a random-seed call continues it
        if generator is not None and latents is None:
            initial = self.initial_latents(request, context, scheduler, 0, None, generator)
            if seed is None:  # the stochastic samplers' per-frame noise: from the same generator
                seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            seed = self.shared_seed(seed, context)
        else:
            seed = self.shared_seed(seed, context)
            initial = self.initial_latents(request, context, scheduler, seed, latents)

        spec: CheckpointSpec | None = None
        resumed: ResumePoint | None = None
        if checkpoint_dir is not None:
            noise = "seed" if latents is None and generator is None else "generator" if latents is None else (
                "latents:" + hashlib.sha256(latents.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest())
            parts = self.checkpoint_fingerprint(request, seed=seed, scheduler=asked_scheduler, engine=engine,
                                                noise=noise)
            spec = CheckpointSpec(Path(checkpoint_dir) / FILE_NAME, checkpoint_every or 1, parts)
            if saved is not None:
                resumed = self.resume_point(saved, parts, context, label=f"resume: {spec.path}")
                initial = resumed.latents
                logger.info("resuming %s at step %d of %d (saved by %d rank(s))", spec.path, resumed.step,
                            num_inference_steps, resumed.saved_world_size)

        self._interrupt = False
        bar = tqdm(total=num_inference_steps, desc="denoising", unit="step", leave=False,
                   disable=not progress or context.rank != 0)

        def on_step_end(index: int, t: torch.Tensor, current: torch.Tensor, _scheduler: Any) -> torch.Tensor | None:
            bar.update(1)
            replaced = None
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, index, t, {"latents": current}) or {}
                replaced = outputs.get("latents")
            if self._interrupt:
                raise StopSampling(replaced)
            return replaced

        if resumed is not None:
            bar.update(resumed.step)
        try:
            result = self.generate_latents(request, context, scheduler, initial, seed=seed, on_step_end=on_step_end,
                                           engine=engine, checkpoint=spec,
                                           start_step=resumed.step if resumed is not None else 0,
                                           restore_scheduler=resumed.restore if resumed is not None else None,
                                           images=images)
        finally:
            bar.close()
        frames = self._output(result, context, output_type)
        if spec is not None and not self._interrupt and context.rank == 0 and spec.path.exists():
            spec.path.unlink()  # the call is complete: its checkpoint is no longer needed
            logger.info("removed the checkpoint %s (the call is complete)", spec.path)
        if not return_dict:
            return (frames,)
        return VideoInfinityPipelineOutput(frames=frames)

    def _existing_checkpoint(self, folder: Path, ctx: ClipContext, resume: bool) -> dict[str, Any] | None:
        """``folder``'s checkpoint to resume from (None: there is none); without ``resume`` a folder
        holding one is refused, so that an unfinished call's progress is not overwritten."""
        path = folder / FILE_NAME
        if resume:
            saved = self.read_checkpoint(path, ctx, label=f"resume: {path}", missing_ok=True)
            if saved is None:
                logger.info("resume: no checkpoint in %s: starting from the first step", folder)
            return saved

        def refuse_existing() -> None:
            if path.exists():
                raise CheckpointError(f"checkpoint_dir: {path} holds the checkpoint of an unfinished call (pass "
                                      "resume=True to continue it, or remove it to start over)")

        agreed(refuse_existing, ctx, self.device)
        return None

    def shared_seed(self, seed: int | None, ctx: ClipContext) -> int:
        """``seed``, or a random one drawn on rank 0 and shared, so that every rank uses the same."""
        if seed is not None:
            return int(seed)
        drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if ctx.distributed:
            drawn = drawn.to(comm_device(ctx, self.device))
            dist.broadcast(drawn, src=ctx.global_rank(0), group=ctx.group)
        return int(drawn.item())

    def _output(self, latents: torch.Tensor, ctx: ClipContext, output_type: str) -> Any:
        if output_type == "latent":
            whole = gather_frames(latents, ctx, latents.device)
            return None if whole is None else whole
        chunks = list(self.stream_frames(latents, ctx))
        if ctx.rank != 0:
            return None
        video = torch.cat(chunks).cpu()  # (frames, H, W, 3) float32 in [0, 1]
        if output_type == "pt":
            return video.permute(0, 3, 1, 2)[None]
        if output_type == "np":
            return video.numpy()[None]
        from PIL import Image

        pixels = (video.numpy() * 255).round().astype(np.uint8)
        return [[Image.fromarray(frame) for frame in pixels]]
