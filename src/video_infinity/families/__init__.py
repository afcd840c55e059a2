"""The registry of model families: the one list of what video-infinity runs.

A family is a package here (``unet3d/``, ``animatediff/``, ``wan/``) holding everything particular
to it: ``detect.py`` (which model folders are its own, from config files alone: no torch, so the
CLI's pre-flight uses it), ``family.py`` (loading and the pipeline steps around the sampling loop:
:class:`~video_infinity.families.base.ModelFamily`) and ``engine.py`` (its engine plan: which
diffusers module types get which hook or processor; ``accepts(model)`` and ``parallelize``).

Everyone asks this module: the pre-flight (:func:`detect`, :func:`unsupported_model`),
``VideoInfinityPipeline.from_pretrained`` (:func:`load_family`), ``from_pipe``
(:func:`family_from_pipe`) and ``video_infinity.parallelize`` (:func:`engine_for`). Importing it
loads no torch; a family's modules load when first needed.

Adding a family: a package with those three modules, one line in ``FAMILIES``, one entry in the
conformance test suite (``tests/test_conformance.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .folder import FolderFacts, ModelFolder

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .base import ModelFamily


@dataclass(frozen=True)
class FamilyEntry:
    """One family of the registry: its package and the class of its loaded components."""

    name: str
    family_class: str
    """The :class:`~video_infinity.families.base.ModelFamily` class in the package's ``family.py``."""

    def module(self, name: str) -> ModuleType:
        """The family's ``detect``, ``family`` or ``engine`` module (imported on first use)."""
        return importlib.import_module(f"{__name__}.{self.name}.{name}")

    @property
    def summary(self) -> str:
        return str(self.module("detect").SUMMARY)

    def load_class(self) -> type[ModelFamily]:
        return getattr(self.module("family"), self.family_class)


FAMILIES: tuple[FamilyEntry, ...] = (
    FamilyEntry("wan", "WanFamily"),
    FamilyEntry("animatediff", "AnimateDiffFamily"),  # before UNet3D: an SD UNet with motion modules
    FamilyEntry("unet3d", "UNet3DFamily"),  # last: the fallback for folders no family recognises
)
"""Families asked in order; the first that recognises a folder, pipeline or model takes it."""

__all__ = ["FAMILIES", "FamilyEntry", "FolderFacts", "ModelFolder", "detect", "engine_for", "family_from_pipe",
           "load_family", "supported_models", "unsupported_model"]


def supported_models() -> str:
    """What to tell a user whose model no family runs."""
    summaries = [entry.summary for entry in FAMILIES]
    return ", ".join(summaries[:-1]) + " and " + summaries[-1]


def _recognise(model: str | Path) -> FolderFacts | str | None:
    """Facts of the family that runs ``model``, a one-line refusal, or None when config files cannot
    tell (no local folder, a hub id not cached, a folder without configs: checked when it loads)."""
    folder = ModelFolder.find(model)
    if folder is None:
        return None
    for entry in FAMILIES:
        verdict = entry.module("detect").detect(folder)
        if isinstance(verdict, FolderFacts):
            return verdict
        if isinstance(verdict, str):
            return _refusal(folder, verdict)
    if not folder.pipeline_class:
        return None  # no model_index.json: left to the loader's own message
    what = ", ".join(f"{name} {cls}" for name in ("transformer", "unet")
                     if (cls := folder.component_class(name)) is not None) or "no transformer or unet"
    return _refusal(folder, what)


def _refusal(folder: ModelFolder, what: str) -> str:
    return (f"model: '{folder.label}' holds a {folder.pipeline_class or 'model'} ({what}), which video-infinity "
            f"does not run; supported: {supported_models()}")


def detect(model: str | Path) -> FolderFacts | None:
    """The facts of a supported model folder (None when refused or when config files cannot tell)."""
    verdict = _recognise(model)
    return verdict if isinstance(verdict, FolderFacts) else None


def unsupported_model(model: str | Path) -> str | None:
    """A one-line refusal (``model: ...``) when ``model`` is a pipeline folder no family runs, naming
    what it holds and what is supported; None when it is supported or cannot be told from config files."""
    verdict = _recognise(model)
    return verdict if isinstance(verdict, str) else None


def plans_memory(family: str) -> bool:
    """Whether ``family`` plans a run's memory (:mod:`video_infinity.plan`: its folder has a ``plan`` module)."""
    return (Path(__file__).parent / family / "plan.py").is_file()


def entry(name: str) -> FamilyEntry:
    for candidate in FAMILIES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no family {name!r} (known: {', '.join(e.name for e in FAMILIES)})")


def load_family(model: str, base_model: str | None, torch_dtype: torch.dtype, device: torch.device,
                family: str | None = None) -> ModelFamily:
    """Load ``model`` (a diffusers folder or hub id) with the family that recognises it from its config
    files (a folder no family recognises, or a hub id not cached, goes to the last, the fallback);
    a pipeline no family runs (e.g. image-to-video Wan) is refused with one line first.
    ``family``: the registry name of the family to load with, when the caller knows it (an
    AnimateDiff motion adapter given with its Stable Diffusion base)."""
    if family is not None:
        return entry(family).load_class().load(model, base_model, torch_dtype, device)
    verdict = _recognise(model)
    if isinstance(verdict, str):
        raise ValueError(verdict)
    chosen = entry(verdict.family) if verdict is not None else FAMILIES[-1]
    return chosen.load_class().load(model, base_model, torch_dtype, device)


def family_from_pipe(pipeline: Any) -> ModelFamily:
    """Wrap an already loaded diffusers pipeline's components (no copy of the weights)."""
    for candidate in FAMILIES:
        family = candidate.load_class()
        if family.can_take(pipeline):
            return family.from_pipe(pipeline)
    raise ValueError(f"from_pipe: {type(pipeline).__name__} is not a supported text-to-video pipeline "
                     f"(supported: {supported_models()})")


def engine_for(model: nn.Module) -> ModuleType:
    """The engine module (``accepts``, ``parallelize``) of the family whose denoiser ``model`` is."""
    for candidate in FAMILIES:
        engine = candidate.module("engine")
        if engine.accepts(model):
            return engine
    denoisers = [name for candidate in FAMILIES for name in candidate.module("detect").DENOISERS]
    raise TypeError(f"{type(model).__name__} is not a denoiser video_infinity runs (supported: {', '.join(denoisers)})")
