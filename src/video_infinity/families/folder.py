"""What a model folder says about itself, read from its config files alone (no torch, no weights).

Each family's ``detect.py`` looks at a :class:`ModelFolder` and answers with :class:`FolderFacts`
(ours, with the shape rules the pre-flight checks before any rank starts), a refusal line (a
pipeline of that family's kind that video-infinity does not run, e.g. image-to-video Wan), or None
(not this family's). The registry (``families/__init__.py``) asks each family in turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; {} when missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class ModelFolder:
    """A local folder (or the Hugging Face cache's snapshot of a hub id) and its ``model_index.json``."""

    path: Path
    label: str
    """How the user named it (for messages)."""
    index: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def find(cls, model: str | Path) -> ModelFolder | None:
        """The folder ``model`` names: a local folder, or a hub id whose ``model_index.json`` is in the
        Hugging Face cache (nothing downloaded); None otherwise."""
        folder = Path(model).expanduser()
        if not folder.is_dir():
            from huggingface_hub import try_to_load_from_cache  # light: no torch

            try:
                cached = try_to_load_from_cache(str(model), "model_index.json")
            except ValueError:  # not a valid repo id
                return None
            if not isinstance(cached, str):
                return None
            folder = Path(cached).parent
        return cls(folder, str(model), read_json(folder / "model_index.json"))

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name") or "")

    def config(self, component: str | None = None) -> dict[str, Any]:
        """``component/config.json`` (the folder's own ``config.json`` for None); {} if absent."""
        return read_json(self.path / component / "config.json" if component else self.path / "config.json")

    def has_component(self, name: str) -> bool:
        """Whether ``model_index.json`` lists component ``name`` (not as ``[null, null]``)."""
        entry = self.index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    def component_class(self, name: str) -> str | None:
        """The class of component ``name``: its ``model_index.json`` entry, else its own config."""
        entry = self.index.get(name)
        if isinstance(entry, list) and len(entry) == 2:
            return None if entry[1] is None else str(entry[1])
        found = self.config(name).get("_class_name")
        return None if found is None else str(found)

    def scheduler_config(self) -> dict[str, Any]:
        return read_json(self.path / "scheduler" / "scheduler_config.json")


@dataclass(frozen=True)
class FolderFacts:
    """What the pre-flight needs to know of a recognised folder, from its config files."""

    family: str
    """The registry name of the family that runs it."""
    components: tuple[str, ...] = ()
    """Subfolders a complete pipeline folder holds (besides vae, text_encoder, tokenizer, scheduler)."""
    temporal_compression: int = 1
    """Video frames per latent frame after the first (1: one latent frame per video frame)."""
    spatial_multiple: int = 8
    """Height and width must be multiples of this."""
    spatial_factor: int = 8
    """Pixels per latent position."""
    latent_channels: int = 4
    latent_element_bytes: int | None = None
    """Bytes of one latent value in the sampling loop (None: the run's dtype)."""
    default_scheduler: str = "sde-dpmsolver++"
    """The sampler when the request names none (``"model"``: the folder's own)."""
    model_scheduler: dict[str, Any] = field(default_factory=dict)
    """The folder's ``scheduler/scheduler_config.json``."""
    supports_loop: bool = True
    """Whether the family makes seamless loops (``EngineConfig.loop``)."""
    rotary_positions: bool = False
    """Whether the family's temporal attention has rotary positions (``attn.rotary_clip`` applies)."""
    image_mode: str | None = None
    """How the model takes a start image (None: it does not): ``"concat"`` (mask and image latents
    concatenated to the noise: Wan2.1 I2V, Wan2.2 A14B I2V) or ``"first_frame"`` (the first latent
    frames replaced by the image's, timestep 0 on their tokens: Wan2.2 TI2V)."""
    image_required: bool = False
    """Whether every request must give an image (a model trained only with one)."""
    last_image: bool = False
    """Whether the model takes an end image too (``last_image``)."""

    def image_problem(self, model: str, given: set[str], video_frames: int | None, num_frames: int) -> str | None:
        """Why this model cannot take the request's images (``given``: the names of the image fields
        set; ``video_frames``: the frames of a given ``video``), as ``field: problem (fix)``; None if it can."""
        if self.image_mode is None:
            if given:
                name = next(n for n in ("image", "video", "last_image") if n in given)
                return (f"{name}: {model} is a text-to-video model (its transformer takes no image); use an "
                        f"image-to-video model or leave {name} out")
            return None
        if self.image_required and not given & {"image", "video"}:
            return (f"image: {model} is an image-to-video model (its transformer takes the image's latents): give "
                    "image (the first frame) or video (the first frames)")
        if "last_image" in given and not self.last_image:
            why = ("conditions on its first frames only (Wan2.2 TI2V)" if self.image_mode == "first_frame" else
                   "embeds one image (no position embedding for two: not a first-last-frame model)")
            return f"last_image: {model} {why}; leave last_image out"
        if "last_image" in given and num_frames < 2:
            return "num_frames: a first and a last image need at least 2 frames"
        if video_frames is not None:
            if video_frames >= num_frames:
                return (f"video: its {video_frames} frames leave none to generate in a {num_frames}-frame video "
                        "(num_frames counts them: make it larger)")
            step = self.temporal_compression
            if self.image_mode == "first_frame" and (video_frames - 1) % step:
                lower = 1 + (video_frames - 1) // step * step
                return (f"video: this model replaces whole latent frames: give 1 + {step}k frames (got "
                        f"{video_frames}; e.g. its last {lower} or {lower + step})")
        return None

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames of a video of ``video_frames`` frames (ValueError naming valid counts)."""
        if self.temporal_compression == 1:
            return video_frames
        from ..frames import latent_frame_count

        return latent_frame_count(video_frames, self.temporal_compression)

    def scheduler_history(self, scheduler: str | None) -> int:
        """Latent-sized tensors the sampler keeps between steps (what a checkpoint saves besides the latents)."""
        name = scheduler or self.default_scheduler
        if name == "ddim":
            return 1
        if name != "model":
            return 2  # DPM-Solver++ keeps its last solver_order (2) model outputs
        kind = self.model_scheduler.get("_class_name")
        order = int(self.model_scheduler.get("solver_order", 2))
        return 1 if kind == "DDIMScheduler" else order + 1 if kind == "UniPCMultistepScheduler" else order  # UniPC: + last sample

