"""Every result file under ``benchmarks/results/`` says what made it and is not older than the code it measures.

Labels (written by ``benchmarks/_common.write_result`` and ``video_infinity.demo.evaluate``, both
through ``video_infinity.demo.provenance``): ``commit``, ``written``, ``command``, ``machine`` (CPU
model and cores; the GPU when there was one), ``environment`` (thread and BLAS knobs) and
``measures``: the repository files and folders the figures depend on. A result is stale when
``git diff <its commit> HEAD -- <measures>`` shows a change to what runs, or when it measured uncommitted changes
to them (``uncommitted_measures``; a ``+changes`` commit without that record counts as clean only if
its measures are unchanged since). ``make bench-cpu`` re-runs every CPU result; a result made on a
GPU may stay older than its code (no GPU here to re-run it) only when it names the engine it
measured (``engine_commit``), says so (``stale_note``), and every page quoting it names that commit.
``benchmarks/bench_cpu.py``'s ``RUNS`` names the producer of every file under ``results/``.
"What runs": a Python file whose syntax tree is unchanged once string statements are dropped (comments,
docstrings and attribute docstrings edited) and a Markdown file (a model folder's README: no measured code reads one) do not
make a result stale; any other change does.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
FILES = sorted(RESULTS.glob("*.json"))
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md", BENCHMARKS / "README.md"]
REQUIRED = ("commit", "written", "command", "machine", "measures")
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.name != "bench_cpu.py")
"""The benchmarks (``_*.py``: their shared helpers; ``bench_cpu.py`` runs them)."""


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _has_history() -> bool:
    """A git checkout with its whole history (a shallow clone lacks the result files' commits)."""
    try:
        return ((ROOT / ".git").exists() and _git("rev-parse", "--verify", "HEAD").returncode == 0
                and _git("rev-parse", "--is-shallow-repository").stdout.strip() != "true")
    except OSError:  # no git
        return False


def _module(path: Path, name: str) -> Any:
    sys.path.insert(0, str(path.parent))  # the scripts import _common from their folder
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


def _gpu_exempt(data: dict[str, Any]) -> bool:
    return bool(data.get("engine_commit") and data.get("stale_note") and (data.get("machine") or {}).get("gpu"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_a_result_file_says_what_made_it(path):
    data = _load(path)
    missing = [key for key in REQUIRED if not data.get(key)]
    assert not missing, f"{path.name} lacks {missing}"
    machine = data["machine"]
    assert machine.get("cpu") and machine.get("host_cpus"), f"{path.name}: machine without CPU model or cores"
    if machine.get("cuda"):
        assert machine.get("gpu"), f"{path.name}: CUDA was there but the GPU is not named"
    measures = data["measures"]
    assert isinstance(measures, list) and all(isinstance(m, str) and m and not m.startswith("/") and ".." not in m
                                              for m in measures), f"{path.name}: measures are repository paths"
    # A file labelled after its run (from git and the docs) cannot know the environment it ran in.
    if "labelled_later" not in data:
        assert isinstance(data.get("environment"), dict), f"{path.name}: no environment knobs"


def _docstrings_dropped(source: str) -> str:
    """``source``'s syntax tree without its string statements (docstrings, attribute docstrings): they
    compute nothing. Comments are not in the tree."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                and isinstance(s.value.value, str))]
                setattr(node, field, kept or [ast.Pass()])
    return ast.dump(tree)


@functools.cache  # many results share a commit and a changed file: read and parse each pair once
def _changes_what_runs(path: str, commit: str) -> bool:
    """Whether ``path``'s change between ``commit`` and HEAD can change a figure (see the module's doc)."""
    if path.endswith(".md"):
        return False
    if not path.endswith(".py"):
        return True
    before, after = _git("show", f"{commit}:{path}"), _git("show", f"HEAD:{path}")
    if before.returncode or after.returncode:  # added or removed
        return True
    try:
        return _docstrings_dropped(before.stdout) != _docstrings_dropped(after.stdout)
    except SyntaxError:
        return True


def test_what_runs_ignores_docstrings_and_comments_only():
    base = 'def f(x):\n    """Old words."""\n    return x + 1  # why\n'
    assert _docstrings_dropped(base) == _docstrings_dropped('def f(x):\n    """New words."""\n    return x + 1\n')
    assert _docstrings_dropped(base) == _docstrings_dropped("def f(x):\n    return x + 1\n")
    assert _docstrings_dropped(base) != _docstrings_dropped('def f(x):\n    """Old words."""\n    return x + 2\n')
    assert _docstrings_dropped('X = 1\n"""About X."""\n') == _docstrings_dropped('X = 1\n"""About X, reworded."""\n')
    assert _docstrings_dropped('X = 1\n"""About X."""\n') != _docstrings_dropped("X = 2\n")
    assert _docstrings_dropped('print("a")\n') != _docstrings_dropped('print("b")\n')  # a string that is used
    assert _docstrings_dropped('def f():\n    """Only words."""\n') == _docstrings_dropped("def f():\n    pass\n")


def test_no_result_is_older_than_the_code_it_measures():
    if not _has_history():
        pytest.skip("no whole git history (a tarball, a shallow clone): the result files' commits cannot be compared")
    stale = []
    for path in FILES:
        data = _load(path)
        if _gpu_exempt(data) or not data.get("commit") or not data.get("measures"):
            continue  # GPU: test below; unlabelled: test above
        recorded = str(data["commit"])
        commit = recorded.split("+")[0]
        if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            stale.append(f"{path.name}: its commit {recorded} is not in this repository's history")
            continue
        dirty = data.get("uncommitted_measures") or []
        if dirty:
            stale.append(f"{path.name}: measured uncommitted changes to {', '.join(dirty)} (at {commit[:9]})")
            continue
        changed = [p for p in _git("diff", "--name-only", commit, "HEAD", "--", *data["measures"]).stdout.split()
                   if _changes_what_runs(p, commit)]
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            source = " (or before: the commit is from git log)" if "commit_source" in data else ""
            stale.append(f"{path.name}: measured at {commit[:9]}{source}; {len(changed)} measured files changed since: "
                         f"{shown}")
    assert not stale, ("result files older than the code they measure; re-run them (`make bench-cpu` for the CPU "
                       "ones, benchmarks/bench_cpu.py --list) and commit the results:\n  " + "\n  ".join(stale))


def test_a_gpu_result_older_than_its_code_names_its_engine_and_the_docs_say_so():
    labelled = [p for p in FILES if "engine_commit" in _load(p) or "stale_note" in _load(p)]
    for path in labelled:
        data = _load(path)
        assert _gpu_exempt(data), f"{path.name}: only a GPU result (machine.gpu) with engine_commit and stale_note may stay stale"
        engine = str(data["engine_commit"])
        assert re.fullmatch(r"[0-9a-f]{7,40}", engine), f"{path.name}: engine_commit {engine!r}"
        if _has_history():
            assert _git("cat-file", "-e", f"{engine}^{{commit}}").returncode == 0, f"{path.name}: {engine} unknown"
        name = re.compile(rf"(?<![\w.]){re.escape(path.name)}")
        quoting = [page for page in PAGES if name.search(page.read_text())]
        assert quoting, f"{path.name}: no page quotes it"
        for page in quoting:
            assert engine[:7] in page.read_text(), (f"{page.relative_to(ROOT)} quotes {path.name} without naming the "
                                                    f"engine it measured ({engine[:7]})")


def test_every_result_file_has_a_producer_and_make_bench_cpu_fits_its_budget():
    bench = _module(BENCHMARKS / "bench_cpu.py", "bench_cpu_for_tests")
    produced = {out for run in bench.RUNS for out in run.outputs}
    on_disk = {p.name for p in RESULTS.iterdir() if p.suffix in (".json", ".png")}
    assert not on_disk - produced, f"result files no run in bench_cpu.RUNS makes: {sorted(on_disk - produced)}"
    for run in bench.RUNS:
        assert run.group in ("cpu", "extra", "gpu"), run
        target = run.argv[1] if run.argv[0] == "-m" else run.argv[0]
        assert (ROOT / target).is_file() or importlib.util.find_spec(target) is not None, run
    default = sum(run.seconds for run in bench.RUNS if run.group == "cpu")
    assert default <= bench.BUDGET_S, f"make bench-cpu's estimate {default} s is over its {bench.BUDGET_S} s budget"
    gpu_made = {out for run in bench.RUNS if run.group == "gpu" for out in run.outputs}
    for path in FILES:
        if path.name not in gpu_made:
            assert not (_load(path).get("machine") or {}).get("gpu"), f"{path.name} was made on a GPU: group 'gpu'"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_benchmark_writes_its_results_through_write_result_with_what_it_measures(script):
    calls = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)]
    writes = [c for c in calls if ast.unparse(c.func) == "write_result"]
    assert writes and all(len(c.args) >= 3 for c in writes), f"{script.name}: write_result(name, payload, MEASURES)"
    by_hand = [ast.unparse(c) for c in calls if ast.unparse(c.func) == "json.dump"
               or (ast.unparse(c.func).endswith("write_text") and c.args and "json.dumps" in ast.unparse(c.args[0]))]
    assert not by_hand, f"{script.name} writes JSON by hand: {by_hand}"
    module = _module(script, f"bench_{script.stem}_for_tests")
    missing = [m for m in module.MEASURES if not (ROOT / m).exists()]
    assert module.MEASURES and not missing, f"{script.name}: MEASURES name missing paths {missing}"


def test_the_demo_evaluation_labels_its_results_the_same_way():
    from video_infinity.demo import WEIGHTS_DIR, evaluate

    labels = evaluate._provenance(["--frames", "4"], WEIGHTS_DIR)
    assert labels["command"] == "python -m video_infinity.demo.evaluate --frames 4"
    assert all(labels.get(key) for key in REQUIRED) and isinstance(labels["environment"], dict)
    assert {"src/video_infinity/demo/evaluate.py", "src/video_infinity/demo/probe.py"} <= set(labels["measures"])
    if _has_history():
        assert "src/video_infinity/demo/weights" in labels["measures"]  # the embedded model is in the repository
