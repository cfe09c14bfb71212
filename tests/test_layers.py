"""The import rules of docs/architecture.md, read from the source: every import statement counts,
those inside functions too, and so does a module named in a string (importlib.import_module("x.y"),
an "x.y:name" entry point, `python -m x.y` in a command), so a rule cannot be kept by hiding an import
in a function or a string."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("ituning", "storage", "pipeline", "tasks", "flows", "cli")
HEAVY = ("torch", "torchvision", "transformers", "open_clip", "prefect", "mlflow")
FORBIDDEN = {
    "ituning": {"storage", "pipeline", "tasks", "flows", "cli"},
    "storage": {"ituning", "pipeline", "tasks", "flows", "cli", *HEAVY},
    "pipeline": {"tasks", "flows", "cli", "prefect"},
    "tasks": {"flows", "cli"},
    "flows": {"cli"},
    "cli": set(),
}
IMPORTING_CALLS = {"import_module", "__import__", "run_module", "find_spec"}
ENTRY_POINT = re.compile(r"([A-Za-z_]\w*)(?:\.\w+)*:[A-Za-z_][\w.]*")  # "flows.in_process:run_full_pipeline"
RUN_AS_MODULE = re.compile(r"(?:^|\s)-m\s+([A-Za-z_]\w*)")  # "python -m flows.server --port 4200"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, relative imports resolved to the file's package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, path.parent.name if node.level else (node.module or "").split(".")[0]))
    return found


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes: a docstring may tell how a module is run without running it."""
    bodies = [node.body for node in ast.walk(tree)
              if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return {id(body[0].value) for body in bodies
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)}


def named_in_strings(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every module a string names to be imported or run: the argument of
    importlib.import_module (an f-string by its fixed start), an "x.y:name" entry point, `-m x.y` in a
    command line, whether one string or a list of arguments."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, skipped = [], docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and _called_name(node) in IMPORTING_CALLS:
            first = node.args[0]
            start = first.values[0] if isinstance(first, ast.JoinedStr) and first.values else first
            if isinstance(start, ast.Constant) and isinstance(start.value, str):
                found.append((node.lineno, start.value.split(".")[0]))
        elif isinstance(node, (ast.List, ast.Tuple)):
            found += [(node.lineno, after.value.split(".")[0]) for flag, after in zip(node.elts, node.elts[1:])
                      if _text(flag) == "-m" and _text(after)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            entry = ENTRY_POINT.fullmatch(node.value)
            found += [(node.lineno, entry.group(1))] if entry else []
            found += [(node.lineno, module) for module in RUN_AS_MODULE.findall(node.value)]
    return found


def _called_name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _text(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def violations(folder: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} {how} {module}"
            for path in sorted((ROOT / folder).rglob("*.py"))
            for how, found in (("imports", imported_modules(path)), ("names in a string", named_in_strings(path)))
            for line, module in found if module in FORBIDDEN[folder]]


@pytest.mark.parametrize("folder", PROJECT)
def test_each_folder_imports_only_what_its_layer_may(folder):
    assert violations(folder) == []


def test_the_rules_see_imports_inside_functions(tmp_path):
    package = tmp_path / "storage"
    package.mkdir()
    (package / "hidden.py").write_text("def load():\n    import torch\n    from pipeline import data\n")
    assert [module for _, module in imported_modules(package / "hidden.py")] == ["torch", "pipeline"]


def test_the_rules_see_modules_named_in_strings(tmp_path):
    package = tmp_path / "pipeline"
    package.mkdir()
    (package / "launcher.py").write_text(
        '"""Run as `python -m cli.main serve`: a docstring names no import."""\n'
        "import importlib, subprocess, sys\n"
        "def start(name):\n"
        '    importlib.import_module("flows.in_process")\n'
        '    importlib.import_module(f"tasks.{name}")\n'
        '    subprocess.Popen([sys.executable, "-m", "flows.server", "--port", "4200"])\n'
        '    subprocess.run(f"{sys.executable} -m cli serve", shell=True)\n'
        '    return "flows.in_process:run_full_pipeline", "coco:val", "-m"\n')
    upward = sorted(found for found in named_in_strings(package / "launcher.py") if found[1] in FORBIDDEN["pipeline"])
    assert upward == [(4, "flows"), (5, "tasks"), (6, "flows"), (7, "cli"), (8, "flows")]


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_importing_all_of_storage_loads_no_heavy_library():
    modules = sorted(path.stem for path in (ROOT / "storage").glob("*.py") if path.stem != "__init__")
    assert loaded_after("; ".join(f"import storage.{module}" for module in modules)) & set(HEAVY) == set()


def test_importing_the_catalog_loads_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import storage.catalog"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "duckdb" in imported and "torch" not in imported
