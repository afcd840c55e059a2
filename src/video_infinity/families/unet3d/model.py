"""Model loading: ModelScope T2V / ZeroScope pipelines and VideoCrafter2's fps-conditioned UNet.

Everything goes through diffusers' and transformers' own ``from_pretrained`` so that real
checkpoints (local folders or Hugging Face hub ids) load exactly as their authors saved them.
Failures become a :class:`ModelLoadError` with a one-line message saying what is missing or broken.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import transformers
from diffusers import AutoencoderKL, UNet3DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from transformers import CLIPTextModel, CLIPTokenizer

from ...errors import ModelLoadError, describe_exception

logger = logging.getLogger(__name__)

DEFAULT_FPS = 24
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_T = TypeVar("_T")
# diffusers warns on every load when it would like accelerate for low_cpu_mem_usage; say "no" up front.
_DIFFUSERS_KW: dict[str, Any] = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
# transformers renamed ``torch_dtype`` to ``dtype`` (4.56); the old name warns in 5.x.
_TF_DTYPE_KW = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"




class FpsUNet3DConditionModel(UNet3DConditionModel):
    """VideoCrafter2's UNet in diffusers layout: a UNet3D whose timestep embedding gets an fps term.

    ``emb = time_embedding(t) + fps_embedding(fps_proj(fps))``. The module names match the
    ``adamdad/videocrafterv2_diffusers`` checkpoint so its weights load. Rather than copying the
    parent's ``forward``, the fps term is added by a forward hook on ``time_embedding`` that is armed
    only for the duration of one call, so diffusers upgrades keep working.
    """

    _skip_layerwise_casting_patterns = ["norm", "time_embedding", "fps_embedding"]

    # The explicit signature is required: diffusers builds the model from the config keys that
    # appear in ``__init__``'s signature, so ``**kwargs`` would silently drop the parent's keys.
    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int] = 64,
        num_attention_heads: int | tuple[int] | None = None,
        time_cond_proj_dim: int | None = None,
        fps_cond: bool = True,
    ) -> None:
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            time_cond_proj_dim=time_cond_proj_dim,
        )
        if fps_cond:
            channels = block_out_channels[0]
            # Same construction as time_proj / time_embedding in the parent (act_fn included).
            self.fps_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.fps_embedding = TimestepEmbedding(channels, 4 * channels, act_fn=act_fn)
        self._pending_fps_emb: torch.Tensor | None = None
        self.time_embedding.register_forward_hook(self._add_fps_embedding)

    def _add_fps_embedding(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self._pending_fps_emb is None:
            return output
        return output + self._pending_fps_emb.to(device=output.device, dtype=output.dtype)

    def fps_embedding_for(
        self, fps: float | int | torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor:
        """The fps embedding, shape ``(batch, 4 * block_out_channels[0])``, in the MLP's dtype."""
        fps_t = torch.as_tensor(DEFAULT_FPS if fps is None else fps, device=device).flatten()
        if fps_t.numel() == 1:
            fps_t = fps_t.expand(batch)  # one fps for the whole batch (e.g. both halves of CFG)
        proj = self.fps_proj(fps_t)
        # fps_proj has no weights and returns float32; the MLP may run in float16/bfloat16.
        return self.fps_embedding(proj.to(self.fps_embedding.linear_1.weight.dtype))

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        fps: float | int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if not self.config.fps_cond:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        self._pending_fps_emb = self.fps_embedding_for(fps, sample.shape[0], sample.device)
        try:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        finally:
            self._pending_fps_emb = None


@dataclass
class ModelComponents:
    """Everything the pipeline needs, loaded and in eval mode."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet3DConditionModel
    scheduler_config: dict[str, Any]
    fps_conditioned: bool
    source: str


# --------------------------------------------------------------------------------------------------
# Locating a model: local folder, Hugging Face cache, or (online) the hub.


def _offline() -> bool:
    # Read the environment each time: huggingface_hub caches HF_HUB_OFFLINE at import time.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is None:
        return bool(constants.HF_HUB_OFFLINE)
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"}


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[A-Za-z0-9][\w.\-]*$")


def _first_line(exc: BaseException) -> str:
    """:func:`describe_exception`, with transformers' pointer to a flag we keep quiet replaced."""
    text = describe_exception(exc)
    if "ignore_mismatched_sizes" in text:
        return f"{type(exc).__name__}: the checkpoint's weight shapes do not match config.json"
    return text


def _complete(loaded: tuple[_T, dict[str, Any]]) -> _T:
    """Unpack ``from_pretrained(..., output_loading_info=True)``; refuse checkpoints that lack weights.

    Both libraries only warn about missing weights and initialise them at random, which would
    give a silently broken model (e.g. a VAE checkpoint in the unet folder).
    """
    model, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weight(s) the config expects, e.g. '{missing[0]}'")
    if info.get("unexpected_keys"):
        logger.warning("%s: ignoring %d unexpected weight(s)", type(model).__name__, len(info["unexpected_keys"]))
    return model


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers warnings and progress bars while loading: problems that
    matter are raised as one-line ModelLoadErrors instead of pages of key lists."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _resolve(model: str) -> tuple[str, bool]:
    """``(reference, is_local)``: a local folder (possibly a cached hub snapshot) or a hub id to fetch."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelLoadError(f"model '{model}' is a file; expected a diffusers model folder or a hub id")
    is_repo_id = _REPO_ID.match(model) is not None and not model.startswith((".", "/", "~"))
    if is_repo_id:
        from huggingface_hub import snapshot_download

        try:  # a hub id already in the local cache behaves like a local folder
            return snapshot_download(model, local_files_only=True), True
        except Exception:  # noqa: BLE001 - any failure here just means "not cached"
            if not _offline():
                return model, False
    if not is_repo_id and not _offline():
        raise ModelLoadError(f"model '{model}' not found: no such folder, and it is not a Hugging Face hub id")
    raise ModelLoadError(
        f"model '{model}' is not available offline: it is neither a local folder nor in the "
        f"Hugging Face cache; download it with `huggingface-cli download {model}` "
        f"(or `hf download {model}`) on a connected machine, or set \"model\" to a local folder"
    )


def _has_file(ref: str, is_local: bool, name: str) -> bool:
    if is_local:
        return (Path(ref) / name).is_file()
    from huggingface_hub import file_exists

    try:
        return file_exists(ref, name)
    except Exception as exc:  # noqa: BLE001 - network errors become one line
        raise ModelLoadError(f"cannot reach the Hugging Face hub for model '{ref}': {_first_line(exc)}") from exc


# What each component subfolder must hold: (description, any-of glob patterns).
_REQUIRED: dict[str, list[tuple[str, list[str]]]] = {
    "unet": [("config.json", ["config.json"]), ("weights", ["diffusion_pytorch_model*"])],
    "vae": [("config.json", ["config.json"]), ("weights", ["diffusion_pytorch_model*"])],
    "text_encoder": [("config.json", ["config.json"]), ("weights", ["model*.safetensors*", "pytorch_model*.bin*"])],
    "tokenizer": [("vocab.json+merges.txt or tokenizer.json", ["tokenizer.json", "merges.txt"])],
    "scheduler": [("scheduler_config.json", ["scheduler_config.json"])],
}


def _missing_files(folder: Path, component: str) -> list[str]:
    """What a local component subfolder lacks (config and weights), as ``component/file`` strings."""
    sub = folder / component
    if not sub.is_dir():
        return [f"{component}/"]
    need = _REQUIRED[component]
    return [f"{component}/{what}" for what, globs in need if not any(any(sub.glob(g)) for g in globs)]


def _guard(component: str, where: str, load: Callable[[], _T]) -> _T:
    """Run a loader, turning any library exception into a one-line ModelLoadError naming the part."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt JSON, truncated safetensors, shape mismatches...
        raise ModelLoadError(f"cannot load {component} from '{where}': {_first_line(exc)}") from exc


def _join(ref: str, subfolder: str | None) -> str:
    return str(Path(ref) / subfolder) if subfolder else ref


# --------------------------------------------------------------------------------------------------
# Public loaders


def _read_config(path_or_id: str, subfolder: str | None) -> dict[str, Any]:
    local = Path(path_or_id) / (subfolder or "") / "config.json"
    if local.is_file():
        with open(local, encoding="utf-8") as f:
            return json.load(f)
    return dict(UNet3DConditionModel.load_config(path_or_id, subfolder=subfolder))


def load_unet(path_or_id: str, torch_dtype: torch.dtype, subfolder: str | None = None) -> UNet3DConditionModel:
    """Load a UNet3D; ``fps_cond: true`` in its config.json selects :class:`FpsUNet3DConditionModel`."""
    config = _read_config(path_or_id, subfolder)
    cls = FpsUNet3DConditionModel if config.get("fps_cond", False) else UNet3DConditionModel
    logger.debug("loading %s from %s", cls.__name__, _join(path_or_id, subfolder))
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "output_loading_info": True, **_DIFFUSERS_KW}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return _complete(cls.from_pretrained(path_or_id, **kwargs))


def _is_unet_config(config: dict[str, Any]) -> bool:
    return "UNet" in str(config.get("_class_name", "")) or "down_block_types" in config


def _pipeline_parts(model: str) -> tuple[str, bool, bool]:
    """``(reference, is_local, unet_only)`` for ``model``; raises if it is neither layout."""
    ref, is_local = _resolve(model)
    if _has_file(ref, is_local, "model_index.json") or _has_file(ref, is_local, "unet/config.json"):
        return ref, is_local, False
    if _has_file(ref, is_local, "config.json"):
        config = _guard("config.json", _join(ref, "config.json"), lambda: _read_config(ref, None))
        if _is_unet_config(config):
            return ref, is_local, True
        raise ModelLoadError(f"'{model}' has a config.json that is not a UNet3D config")
    raise ModelLoadError(
        f"'{model}' is not a diffusers model: it has neither model_index.json (pipeline with "
        "unet/ vae/ text_encoder/ tokenizer/ scheduler/) nor a UNet config.json at its root"
    )


def _check_components(ref: str, is_local: bool, components: tuple[str, ...], label: str) -> None:
    if not is_local:
        return  # a hub repository is checked by from_pretrained itself
    missing = [m for c in components for m in _missing_files(Path(ref), c)]
    if missing:
        raise ModelLoadError(f"model folder '{label}' is incomplete: missing {', '.join(missing)}")


def load_model(
    model: str,
    base_model: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelComponents:
    """Load tokenizer, text encoder, VAE, UNet and scheduler config for text-to-video generation.

    ``model`` is a diffusers pipeline (folder or hub id) or a UNet-only folder/repository (as
    ``adamdad/videocrafterv2_diffusers``), in which case the other parts come from ``base_model``.
    """
    ref, is_local, unet_only = _pipeline_parts(model)
    if unet_only:
        if base_model is None:
            raise ModelLoadError(
                f"model '{model}' holds only a UNet; set base_model to a diffusers pipeline that provides "
                "vae, text_encoder, tokenizer and scheduler (e.g. cerspense/zeroscope_v2_576w)"
            )
        base_ref, base_local, base_unet_only = _pipeline_parts(base_model)
        if base_unet_only:
            raise ModelLoadError(f"base_model '{base_model}' holds only a UNet; it must be a full diffusers pipeline")
        unet_ref, unet_sub = ref, None
        _check_components(base_ref, base_local, ("vae", "text_encoder", "tokenizer", "scheduler"), base_model)
        source = f"{model} (unet) + {base_model} (vae, text encoder, tokenizer, scheduler)"
    else:
        if base_model is not None:
            logger.info("model '%s' is a full pipeline; ignoring base_model '%s'", model, base_model)
        base_ref, base_local = ref, is_local
        unet_ref, unet_sub = ref, "unet"
        _check_components(ref, is_local, COMPONENTS, model)
        source = model

    from diffusers import DPMSolverMultistepScheduler

    with _quiet_libraries():
        unet = _guard("unet", _join(unet_ref, unet_sub), lambda: load_unet(unet_ref, torch_dtype, subfolder=unet_sub))
        vae = _guard("vae", _join(base_ref, "vae"), lambda: _complete(AutoencoderKL.from_pretrained(
            base_ref, subfolder="vae", torch_dtype=torch_dtype, output_loading_info=True, **_DIFFUSERS_KW)))
        text_encoder = _guard("text_encoder", _join(base_ref, "text_encoder"), lambda: _complete(
            CLIPTextModel.from_pretrained(
                base_ref, subfolder="text_encoder", output_loading_info=True, **{_TF_DTYPE_KW: torch_dtype})))
        tokenizer = _guard(
            "tokenizer", _join(base_ref, "tokenizer"),
            lambda: CLIPTokenizer.from_pretrained(base_ref, subfolder="tokenizer"),
        )
        scheduler_config = _guard(
            "scheduler", _join(base_ref, "scheduler"),
            lambda: dict(DPMSolverMultistepScheduler.load_config(base_ref, subfolder="scheduler")),
        )
    for module in (unet, vae, text_encoder):
        module.to(device).eval()  # eval: TemporalConvLayer has dropout
    fps_conditioned = isinstance(unet, FpsUNet3DConditionModel) and bool(unet.config.fps_cond)
    logger.info("loaded %s (%s, fps conditioning: %s)", source, type(unet).__name__, fps_conditioned)
    return ModelComponents(tokenizer, text_encoder, vae, unet, scheduler_config, fps_conditioned, source)
