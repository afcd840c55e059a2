"""The documentation site's generated pages (docs/hooks.py, run by mkdocs at every build): the config
reference holds every field of the run config's models and of the generation request, with its
type, default and docstring; every page is in the navigation; the README stays a short overview.
(``make docs`` builds the whole site with ``mkdocs build --strict``.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.unit


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        nested = [t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested and key.rsplit(".", 1)[-1] != "global_phase":  # one PhaseConfig table, under local_phase
            keys.extend(_keys(nested[0], f"{key}."))
    return keys


def test_the_config_reference_has_every_run_config_key_with_its_docstring():
    from video_infinity.run.config import RunConfig

    page = _hooks().run_config_reference()
    for key in _keys(RunConfig):
        assert f"| `{key}` |" in page, key
    assert "`plugin_configs.split_invariant` | bool \\| null | `null`" in page
    # the docstring of a field, reST markup turned into markdown
    assert "Local window: each query frame sees the frames within `padding` frames of itself." in page
    assert "``" not in page and ":class:" not in page and ":mod:" not in page
    # every row has the table's five cells (no bar of a type or docstring left unescaped)
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows and all(line.replace("\\|", "").count("|") == 6 for line in rows)


def test_the_request_reference_has_every_keyword_of_the_python_call():
    from video_infinity.request import GenerationRequest

    page = _hooks().request_reference()
    for key in GenerationRequest.model_fields:
        assert f"| `{key}` |" in page, key
    assert "| `num_frames` | int | required | >= 1 |" in page


def test_every_docs_page_is_in_the_navigation():
    import yaml  # mkdocs' own dependency, installed with the docs extra; pyyaml otherwise

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    listed = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk <= listed, sorted(on_disk - listed)
    assert listed - on_disk == {"benchmarks/index.md"}  # added by docs/hooks.py from benchmarks/README.md


def test_the_readme_is_an_overview_of_at_most_250_lines_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for said in ("No real pretrained weights of any family have been run here", "No whole generation, no multi-GPU run",
                 "Multi-node has never been run", "torchrun --standalone"):
        assert said in readme, said
