"""Session fixtures shared by the test modules, and the markers of files that do not set their own.

Markers (registered in pyproject.toml): ``unit`` (one process, in-process calls), ``distributed``
(real gloo processes), ``e2e`` (the command line in subprocesses), ``quality`` (the demo model's videos
judged by the probe). ``pytest -m unit`` (``make test-fast``) runs the fast part.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Modules whose tests share one kind get their marker here (the others mark each test or set pytestmark).
_FILE_MARKERS = {
    "test_engine_units.py": "unit", "test_engine_distributed.py": "distributed", "test_config.py": "unit",
    "test_models.py": "unit", "test_probe.py": "unit", "test_video_io.py": "unit", "test_demo_model.py": "unit",
    "test_demo_train.py": "e2e", "test_ui_units.py": "unit", "test_ui_api.py": "e2e", "test_ui_browser.py": "e2e",
}


# The longest files first (longest first by `make test --durations` on 2026-12-03), so that the two
# xdist workers of `make test` (--dist loadfile --no-loadscope-reorder) finish together: xdist's default
# order, files with many tests first, left the longest files (few slow tests each) for the end.
_LONGEST_FIRST = (
    "test_conformance.py", "test_reliability.py", "test_demo_train.py", "test_demo_model.py", "test_ui_browser.py",
    "test_wan_family.py", "test_demo_train_wan.py", "test_ui_api.py", "test_generate.py", "test_plan.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A stable sort: the other files, and the tests within each file, keep their order.
    first = {name: index for index, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(Path(str(item.fspath)).name, len(first)))
    for item in items:
        marker = _FILE_MARKERS.get(Path(str(item.fspath)).name)
        if marker is not None and not any(any(item.iter_markers(name=name)) for name in (marker, "quality")):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny random text-to-video pipeline folder (diffusers layout), built once per session."""
    from video_infinity.demo.random_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def offline_env() -> dict[str, str]:
    """The environment for subprocesses: no hub, no tokenizer threads."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
