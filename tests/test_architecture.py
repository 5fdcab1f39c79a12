"""The house rules of ARCHITECTURE.md, checked: layers that run one way, no module reaching into another's
private names, library files of one idea each (a length bound), and a public API that is what it says."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("nad_guard", "nad_guard_cli", "service", "training")
MAX_LIBRARY_LINES = 520  # "about 500" (issue 18): a file past this holds more than one idea


def _python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if "results" not in p.parts)


def test_layers_run_one_way():
    """import-linter's layers contract (pyproject.toml): nad_guard_cli > service | training > nad_guard. It reads
    every import, those inside functions too, so a cycle cannot hide in a function body."""
    exe = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout, run.stdout


def _private_imports(path: Path) -> list[str]:
    """``from <project module> import _name`` in ``path`` where the module is not ``path``'s own package."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    here = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PROJECT_PACKAGES or node.module == here:
                continue
            bad += [f"{rel}: from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in PROJECT_PACKAGES:
                bad.append(f"{rel}: {base.id}.{node.attr}")
    return bad


def test_no_module_imports_another_modules_private_names():
    files = _python_files(*PROJECT_PACKAGES, "bench", "tests")
    assert len(files) > 40
    bad = [b for f in files for b in _private_imports(f)]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_library_files_hold_one_idea_each():
    long = {str(p.relative_to(ROOT)): n for p in _python_files("nad_guard")
            if (n := len(p.read_text().splitlines())) > MAX_LIBRARY_LINES}
    assert not long, f"library files longer than {MAX_LIBRARY_LINES} lines: {long}"


def test_the_public_api_is_what_it_says():
    import nad_guard

    assert len(set(nad_guard.__all__)) == len(nad_guard.__all__)
    for name in nad_guard.__all__:
        if name == "__version__":
            continue
        assert not name.startswith("_"), name
        value = getattr(nad_guard, name)
        if inspect.isclass(value) or inspect.isfunction(value):  # defined here, not re-exported from elsewhere
            assert value.__module__.startswith("nad_guard."), (name, value.__module__)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        nad_guard.not_a_name  # noqa: B018
    assert {"Guard", "PathModel", "PathDetector", "Classifier", "load_dataset"} <= set(nad_guard.__all__)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written there (the first ```python block), runs and prints a record."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start:text.index("```", start)]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    records = namespace.get("records")
    assert records and len(records) == 4, "the README example should leave its four answers in `records`"
    assert {"label", "confidence", "trust_score", "is_suspicious"} <= set(records[0])
    assert all(0 < r["trust_score"] <= 1 for r in records)


@pytest.mark.parametrize("top", ["bench"])
def test_bench_imports_only_public_names(top):
    bad = [b for f in _python_files(top) for b in _private_imports(f)]
    assert not bad, "\n".join(bad)
