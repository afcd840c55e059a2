"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

* ``on_page_markdown``: a page's ``<!-- generated: NAME -->`` marker is replaced by the reference
  that ``GENERATED[NAME]`` renders from the pydantic models themselves (field, type, default,
  constraints, docstring), at every build, so the reference cannot go stale:
  ``run-config`` (:class:`video_infinity.run.config.RunConfig` and every model below it, the
  engine's :class:`video_infinity.config.EngineConfig` included) and ``request``
  (:class:`video_infinity.request.GenerationRequest`, the Python call's keywords).
* ``on_files``: ``benchmarks/README.md`` (where it stays, beside its scripts) and the plots under
  ``benchmarks/results/`` become the site's ``benchmarks/`` page, so its relative image links work.

The renderers take no mkdocs objects: ``tests/test_docs.py`` calls them directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent


# ---- the schema rendered as markdown ---------------------------------------------------------------


def _clean(text: str | None) -> str:
    """A docstring as one markdown table cell: reST roles and double backticks as code, one line."""
    if not text:
        return ""
    text = re.sub(r":(?:mod|class|meth|func|attr|data):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    text = " ".join(text.split())
    return text.replace("|", "\\|")


def _type(annotation: Any, anchors: dict[type, str]) -> str:
    """A field's type as the JSON a config file holds (``int``, ``"a" | "b"``, ``list[int]``, ``null``),
    with its alternatives' bars escaped for a table cell."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type(args[0], anchors)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(arg)}`" for arg in args)
    if origin in (Union, UnionType):
        return " \\| ".join(_type(arg, anchors) for arg in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type(arg, anchors) for arg in args)}]"
    if annotation is NoneType:
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if annotation in anchors:
            return f"[{annotation.__name__}](#{anchors[annotation]})"
        return annotation.__name__
    return str(annotation)


def _default(field: Any, nested: dict[type, str]) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        if type(value) in nested and _is_model_default(value):  # its own table's defaults
            return "see its table"
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value)}`"


def _is_model_default(value: Any) -> bool:
    try:
        return type(value)() == value
    except Exception:  # a model with required fields has no defaults of its own
        return False


def _constraints(field: Any) -> str:
    words = []
    for item in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            value = getattr(item, attribute, None)
            if value is not None and not isinstance(value, type):
                words.append(f"{symbol} {value}")
    alias = field.validation_alias
    others = [name for name in getattr(alias, "choices", []) if isinstance(name, str)][1:]
    if others:
        words.append("also spelt " + ", ".join(f"`{name}`" for name in others))
    return "; ".join(words)


def _anchor(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def _models_below(root: type, key: str) -> list[tuple[str, type]]:
    """(key, model) of ``root`` and of every pydantic model among its fields' types, depth first."""
    from pydantic import BaseModel

    found = [(key, root)]
    for name, field in root.model_fields.items():
        candidates = [field.annotation, *get_args(field.annotation)]
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found.extend(_models_below(candidate, f"{key}.{name}" if key else name))
    return found


def render_models(root: type, key: str = "", heading: str = "###") -> str:
    """Markdown tables of ``root`` and of every model below it: one table per model, one row per
    field (the config file's key, its JSON type, default, constraints, the field's docstring)."""
    entries = _models_below(root, key)
    # A model reached under two keys (local_phase and global_phase) gets one table naming both.
    keys_of: dict[type, list[str]] = {}
    for entry_key, model in entries:
        keys_of.setdefault(model, []).append(entry_key)
    anchors = {model: _anchor(model.__name__) for model in keys_of}
    blocks = []
    for model, model_keys in keys_of.items():
        shown = ", ".join(f"`{k}`" for k in model_keys if k) or "the top level"
        lines = [
            f"{heading} {model.__name__} {{#{anchors[model]}}}",
            "",
            f"Keys under {shown}. {_clean(model.__doc__)}",
            "",
            "| key | type | default | constraints | meaning |",
            "|---|---|---|---|---|",
        ]
        prefix = f"{model_keys[0]}." if model_keys[0] else ""
        for name, field in model.model_fields.items():
            lines.append(
                f"| `{prefix}{name}` | {_type(field.annotation, anchors)} | {_default(field, anchors)} "
                f"| {_constraints(field)} | {_clean(field.description)} |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def run_config_reference() -> str:
    """The run config file (``video-infinity generate --config``), with the engine's knobs under
    ``plugin_configs``."""
    from video_infinity.run.config import RunConfig

    return render_models(RunConfig)


def request_reference() -> str:
    """The generation request: the keywords of ``VideoInfinityPipeline.__call__``."""
    from video_infinity.request import GenerationRequest

    return render_models(GenerationRequest, heading="###")


GENERATED = {"run-config": run_config_reference, "request": request_reference}


# ---- mkdocs events ------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for name, render in GENERATED.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    if page.file.src_uri == "benchmarks/index.md":
        note = ("!!! note \"This page is `benchmarks/README.md`\"\n    Included as it stands beside the "
                "benchmark scripts; the result files it cites are under `benchmarks/results/`.\n\n")
        first_line, _, rest = markdown.partition("\n")
        markdown = f"{first_line}\n\n{note}{rest}"
    return markdown


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    benchmarks = ROOT / "benchmarks"
    files.append(File.generated(config, "benchmarks/index.md", abs_src_path=str(benchmarks / "README.md")))
    for plot in sorted((benchmarks / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{plot.name}", abs_src_path=str(plot)))
    return files
