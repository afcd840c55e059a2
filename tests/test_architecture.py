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


# ---- the family layout (docs/architecture.md) ---------------------------------------------------------
FAMILIES_DIR = PACKAGE / "families"
CORE = ("engine", "context", "frames", "config", "noise", "denoise", "schedulers", "prompts", "errors", "atomic",
        "request", "checkpoint", "memory",
        "video_io", "presets")
"""The model-agnostic core: knows no family, not even the registry."""


def _family_names() -> list[str]:
    return sorted(p.parent.name for p in FAMILIES_DIR.glob("*/detect.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in ``path``, lazy ones inside functions included;
    relative imports resolved to absolute module names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def _diffusers_names(family: str) -> set[str]:
    tree = ast.parse((FAMILIES_DIR / family / "detect.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DIFFUSERS_NAMES" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"families/{family}/detect.py declares no DIFFUSERS_NAMES")


def test_every_family_is_one_folder_in_the_registry():
    from video_infinity.families import FAMILIES

    assert [e.name for e in FAMILIES] and sorted(e.name for e in FAMILIES) == _family_names()
    for family in _family_names():
        for module in ("__init__", "detect", "family", "engine"):
            assert (FAMILIES_DIR / family / f"{module}.py").is_file(), f"families/{family}/{module}.py"


def test_no_module_outside_a_family_folder_imports_its_diffusers_classes():
    offences = []
    for family in _family_names():
        names = _diffusers_names(family)
        assert names
        for path in PACKAGE.rglob("*.py"):
            rel = path.relative_to(PACKAGE)
            if rel.parts[0] == "demo" or rel.parts[:2] == ("families", family):
                continue
            for module, imported in _imports(path):
                if not module.startswith("diffusers"):
                    continue
                hit = (set(module.split(".")) | set(imported)) & names
                if hit:
                    offences.append(f"{rel}: {module} {sorted(hit)} (family {family})")
    assert not offences, offences


def test_the_core_imports_no_family_and_only_the_registry_reaches_a_family_package():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        in_core = rel.parts[0].removesuffix(".py") in CORE
        for module, imported in _imports(path):
            if not module.startswith("video_infinity.families"):
                continue
            targets = [module] if module != "video_infinity.families" else [f"{module}.{n}" for n in imported]
            for target in targets:
                parts = target.split(".")
                family_package = len(parts) > 2 and parts[2] in _family_names()
                if in_core or (family_package and rel.parts[0] not in ("families", "demo")):
                    offences.append(f"{rel}: {target}")
    assert not offences, offences


def test_the_registry_and_every_detect_module_load_without_torch():
    import subprocess
    import sys

    code = ("import sys; from video_infinity import families as f; "
            "[e.module('detect') for e in f.FAMILIES]; f.supported_models(); "
            "import video_infinity.run.preflight; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch/diffusers imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
