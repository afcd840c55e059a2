"""Which diffusers pipelines video-infinity runs, told from a folder's config files alone (no torch,
no weights read), so that the CLI's pre-flight and ``VideoInfinityPipeline.from_pretrained`` refuse
an unsupported one (image-to-video Wan, Stable Diffusion, ...) with the same one line, before any
model work.

Supported: text-to-video Wan (``WanPipeline``: Wan2.1, Wan2.2 A14B and TI2V-5B used as
text-to-video), UNet3D text-to-video (a ``UNet3DConditionModel`` pipeline such as ModelScope or
VideoCrafter2) and AnimateDiff (an ``AnimateDiffPipeline`` folder, or a ``MotionAdapter`` on Stable
Diffusion 1.5). A folder is judged by what it holds, not only by the pipeline class it was saved
with: a ``WanPipeline`` folder whose transformer takes image conditioning is image-to-video.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WAN_PIPELINE_CLASSES = ("WanPipeline",)
"""``_class_name`` values of ``model_index.json`` of text-to-video Wan folders."""

SUPPORTED_MODELS = ("text-to-video Wan (WanPipeline), UNet3D text-to-video (TextToVideoSDPipeline) and AnimateDiff "
                    "(AnimateDiffPipeline, or a MotionAdapter on Stable Diffusion 1.5)")
"""What to tell a user whose model is none of these."""

_UNET_PIPELINE_CLASSES = ("TextToVideoSDPipeline",)
_UNET_CLASSES = ("UNet3DConditionModel", "UNetMotionModel")  # the denoisers of the UNet3D and AnimateDiff families


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _component_class(index: dict[str, Any], folder: Path, name: str) -> str | None:
    """The class of component ``name``: its ``model_index.json`` entry, else its own config."""
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2:
        return None if entry[1] is None else str(entry[1])
    found = _read_json(folder / name / "config.json").get("_class_name")
    return None if found is None else str(found)


def _image_conditioning(index: dict[str, Any], folder: Path) -> list[str]:
    """What in a Wan folder takes an image: an image encoder, a transformer with an image embedder
    (``image_dim``) or with more input than output channels (image latents concatenated, Wan2.2 I2V)."""
    found = [f"an {name} component" for name in ("image_encoder", "image_processor")
             if _component_class(index, folder, name) is not None]
    for name in ("transformer", "transformer_2"):
        config = _read_json(folder / name / "config.json")
        if config.get("image_dim") is not None:
            found.append(f"{name} image_dim {config['image_dim']}")
        ins, outs = config.get("in_channels"), config.get("out_channels")
        if isinstance(ins, int) and isinstance(outs, int) and ins != outs:
            found.append(f"{name} in_channels {ins} != out_channels {outs}")
    return found


def _config_folder(model: str | Path) -> Path | None:
    """A local folder, or the Hugging Face cache's snapshot of a hub id whose ``model_index.json`` is
    there (nothing downloaded); None otherwise."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import try_to_load_from_cache  # light: no torch

    try:
        cached = try_to_load_from_cache(str(model), "model_index.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def unsupported_model(model: str | Path) -> str | None:
    """A one-line refusal (``model: ...``) when the pipeline folder ``model`` (or a hub id in the
    Hugging Face cache) is not a supported text-to-video model, naming what it holds and what is
    supported; None when it is supported or cannot be told from config files (no
    ``model_index.json``: a UNet-only folder, a motion adapter, a hub id not cached; those are
    checked when they load)."""
    folder = _config_folder(model)
    if folder is None:
        return None
    index = _read_json(folder / "model_index.json")
    class_name = str(index.get("_class_name") or "")
    if not class_name:
        return None
    if class_name.startswith("Wan"):
        image = _image_conditioning(index, folder)
        if class_name in WAN_PIPELINE_CLASSES and not image:
            return None
    else:
        image = []  # an AnimateDiff folder's image_encoder is an optional IP-Adapter: text-to-video still
        if class_name in _UNET_PIPELINE_CLASSES or class_name.startswith("AnimateDiff") or \
                _component_class(index, folder, "unet") in _UNET_CLASSES:
            return None
    if image or "ImageToVideo" in class_name:
        what = f"image-to-video: {', '.join(image)}" if image else "image-to-video"
    else:
        what = ", ".join(f"{name} {cls}" for name in ("transformer", "unet")
                         if (cls := _component_class(index, folder, name)) is not None) or "no transformer or unet"
    return f"model: '{model}' holds a {class_name} ({what}), which video-infinity does not run; supported: {SUPPORTED_MODELS}"
