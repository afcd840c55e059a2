"""The package's shape: no import circle, one sampling loop, one owner of atomic writes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "video_infinity"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports at module level (imports inside functions are lazy by design)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("video_infinity"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("video_infinity"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_circle_among_the_package_modules():
    graph = _import_graph()
    assert "video_infinity.pipeline" in graph and graph["video_infinity.cli"]  # the walk found the modules
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def _calls(path: Path) -> list[str]:
    return [ast.unparse(n.func) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def test_one_sampling_loop_in_the_tree():
    # Every scheduler step of the package, its benchmarks and its tests happens in video_infinity.denoise.sample.
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    stepping = sorted(str(p.relative_to(ROOT)) for p in files if any(c.endswith("scheduler.step") for c in _calls(p)))
    assert stepping == ["src/video_infinity/denoise.py"], stepping


def test_one_owner_of_atomic_file_writes():
    # Temporary files and renames into place: only video_infinity.atomic (directories aside: os.rename of a folder).
    owners = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                    if any(c in ("tempfile.mkstemp", "os.replace") for c in _calls(p)))
    assert owners == ["src/video_infinity/atomic.py", "src/video_infinity/demo/train.py"], owners
