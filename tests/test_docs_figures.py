"""Every figure the documentation ties to a result file equals that file's value, as rounded in the text.

A figure is tied by a marker right after it (within a few characters, so it sits beside the number):

    0.85 <!-- fig: loop.json videos.0.wrap_ratio -->
    83% <!-- fig: demo_direction_seed1000.json results.0.direction_accuracy_by_direction.right *100 -->
    4.6 GiB <!-- fig: one_gpu.json models."Wan2.1-T2V-1.3B 480x832".calls.frame_chunked.peak_mib.1025 /1024 -->

``FILE.json`` is under ``benchmarks/results/``; the path walks dict keys and list indices, a key with
dots or spaces in double quotes; an optional last word ``*N`` or ``/N`` scales the JSON's value
into the text's unit. The quoted figure is the last number before the marker; it must equal the
scaled value to the decimals shown (``1.4e-6``: to the mantissa's decimals). A marker in backticks
is an example, not a tie. Scanned: the docs
pages, README.md and benchmarks/README.md. Whether a result file is older than the code it measures
is checked by tests/test_results_labels.py.

After re-running benchmarks, ``python tests/test_docs_figures.py --refresh`` rewrites each tied
figure that disagrees with its file (same decimals and thousands separators) and prints every
change with its page and line: the prose around a figure is not checked, so read each one.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
logger = logging.getLogger("docs_figures")
MARKER = re.compile(r"<!--\s*fig:\s*(\S+\.json)\s+(.*?)\s*-->", re.S)
NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:e-?\d+)?|(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?")
NEAR = 40
"""Characters at most between the end of the quoted figure and its marker."""

pytestmark = pytest.mark.unit


def _path(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    assert not quoted, f"unclosed quote in {text!r}"
    return [*parts, current]


def _lookup(data: Any, path: list[str]) -> Any:
    for part in path:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _ties(text: str) -> Iterator[tuple[re.Match[str], str, str | None, int]]:
    """Each marker of ``text`` that ties a figure: (the marker's match, its JSON path, its scale or
    None, where the text before it starts: the end of the previous such marker)."""
    previous = 0
    for match in MARKER.finditer(text):
        if text[match.start() - 1: match.start()] == "`":  # a marker shown as code, e.g. in prose about markers
            continue
        words = match.group(2).rsplit(" ", 1)
        scale = words[1] if len(words) == 2 and re.fullmatch(r"[*/]\d+(?:\.\d+)?", words[1]) else None
        yield match, words[0] if scale else match.group(2), scale, previous
        previous = match.end()


@functools.cache
def _result(file: str) -> Any:
    return json.loads((RESULTS / file).read_text())


def _value(file: str, path: str, scale: str | None) -> Any:
    """The JSON's value at ``path``, scaled into the text's unit (a value that is no number: as it is)."""
    value = _lookup(_result(file), _path(path))
    if scale and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = value * float(scale[1:]) if scale[0] == "*" else value / float(scale[1:])
    return value


def _markers() -> list[tuple[str, int, str, str, str | None, str]]:
    """(page, line, file, path, scale, the text between the previous marker and this one)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match, path, scale, previous in _ties(text):
            found.append((str(page.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1, match.group(1),
                          path, scale, text[previous: match.start()]))
    return found


MARKERS = _markers()


def test_the_docs_tie_figures_to_result_files():
    assert len(MARKERS) >= 20
    assert {page for page, *_ in MARKERS} >= {"docs/performance.md", "docs/loops.md", "docs/demo.md"}


def _matches(shown: str, value: float) -> bool:
    quoted = Decimal(shown.replace(",", ""))
    if "e" in shown.lower():
        mantissa = shown.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(Decimal(f"{value:.{decimals}e}")) == float(quoted)
    decimals = -quoted.as_tuple().exponent if quoted.as_tuple().exponent < 0 else 0
    return abs(Decimal(repr(value)) - quoted) <= Decimal(5) * Decimal(10) ** (-decimals - 1) + Decimal("1e-12")


@pytest.mark.parametrize("page,line,file,path,scale,before", MARKERS,
                         ids=[f"{m[0]}:{m[1]}" for m in MARKERS])
def test_a_quoted_figure_equals_its_result_file(page, line, file, path, scale, before):
    value = _value(file, path, scale)
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{file} {path}: {value!r} is no number"
    numbers = list(NUMBER.finditer(before))
    assert numbers, f"{page}:{line}: no figure before the marker"
    last = numbers[-1]
    assert len(before) - last.end() <= NEAR, f"{page}:{line}: the marker is not beside its figure ({last.group()!r})"
    assert _matches(last.group(), value), f"{page}:{line}: the text says {last.group()}, {file} {path} holds {value}"


TABLE = re.compile(r"<!--\s*table:\s*(\S+\.json)\s*-->\n+((?:\|.*\|\n?)+)")
TABLE_MAKERS = {"dit_settings.json": ("dit_settings.py", "results")}
"""Result files whose docs quote a whole table, marked ``<!-- table: FILE.json -->`` right above it:
the script that wrote the file prints the table with its ``table`` function from this key's value."""
TABLES = [(str(page.relative_to(ROOT)), m.group(1), m.group(2)) for page in PAGES
          for m in TABLE.finditer(page.read_text())]


def _script(name: str):
    import importlib.util
    import sys

    folder = str(ROOT / "benchmarks")
    sys.path.insert(0, folder)  # the scripts import _common from their folder
    try:
        spec = importlib.util.spec_from_file_location(f"docs_table_{Path(name).stem}", ROOT / "benchmarks" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)


@pytest.mark.parametrize("page,file,shown", TABLES, ids=[f"{t[0]}:{t[1]}" for t in TABLES])
def test_a_quoted_table_is_the_one_its_result_file_prints(page, file, shown):
    assert file in TABLE_MAKERS, f"{page}: no table maker for {file} (TABLE_MAKERS)"
    script, key = TABLE_MAKERS[file]
    expected = _script(script).table(json.loads((RESULTS / file).read_text())[key])
    assert shown.strip() == expected.strip(), f"{page}: the table differs from {file} (print it: benchmarks/{script})"


def test_the_comparison_respects_the_rounding_shown():
    assert _matches("0.85", 0.8466) and not _matches("0.84", 0.8466)
    assert _matches("1,024", 1024) and _matches("70", 70.35) and not _matches("71", 70.35)
    assert _matches("1.4e-6", 1.430511474609375e-06) and not _matches("1.5e-6", 1.430511474609375e-06)
    assert _matches("1.000", 1.0) and not _matches("1.000", 1.0006)
    assert _path('models."Wan2.1 480x832".calls') == ["models", "Wan2.1 480x832", "calls"]


def _formatted(shown: str, value: float) -> str:
    """``value`` written as ``shown`` is: its decimals (or mantissa decimals) and thousands separators."""
    if "e" in shown.lower():
        mantissa = shown.lower().split("e")[0]
        return f"{value:.{len(mantissa.split('.')[1]) if '.' in mantissa else 0}e}".replace("e-0", "e-").replace("e+0", "e")
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:{',' if ',' in shown else ''}.{decimals}f}"


def refresh() -> int:
    """Rewrite the tied figures that disagree with their result files; returns how many changed."""
    changed = 0
    for page in PAGES:
        text = page.read_text()
        edits = []
        for match, path, scale, previous in _ties(text):
            value = _value(match.group(1), path, scale)
            numbers = list(NUMBER.finditer(text[previous: match.start()]))  # as the test reads them
            if not numbers or _matches(numbers[-1].group(), value):
                continue
            start, end = previous + numbers[-1].start(), previous + numbers[-1].end()
            edits.append((start, end, _formatted(numbers[-1].group(), value)))
            logger.info("%s:%d: %s -> %s  (%s %s)", page.relative_to(ROOT), text.count("\n", 0, start) + 1,
                        numbers[-1].group(), edits[-1][2], match.group(1), match.group(2))
        for start, end, new in reversed(edits):
            text = text[:start] + new + text[end:]
        if edits:
            page.write_text(text)
            changed += len(edits)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        sys.exit("usage: python tests/test_docs_figures.py --refresh")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%d figures rewritten", refresh())
