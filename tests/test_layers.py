"""The import rules of docs/architecture.md, read from the source: every import statement counts,
those inside functions too, so a rule cannot be kept by hiding an import in a function."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("ituning", "storage", "pipeline", "tasks", "flows")
HEAVY = ("torch", "torchvision", "transformers", "open_clip", "prefect", "mlflow")
FORBIDDEN = {
    "ituning": {"storage", "pipeline", "tasks", "flows"},
    "storage": {"ituning", "pipeline", "tasks", "flows", *HEAVY},
    "pipeline": {"tasks", "flows", "prefect"},
    "tasks": {"flows"},
    "flows": set(),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, relative imports resolved to the file's package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, path.parent.name if node.level else (node.module or "").split(".")[0]))
    return found


def violations(folder: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in sorted((ROOT / folder).rglob("*.py"))
            for line, module in imported_modules(path) if module in FORBIDDEN[folder]]


@pytest.mark.parametrize("folder", PROJECT)
def test_each_folder_imports_only_what_its_layer_may(folder):
    assert violations(folder) == []


def test_the_rules_see_imports_inside_functions(tmp_path):
    package = tmp_path / "storage"
    package.mkdir()
    (package / "hidden.py").write_text("def load():\n    import torch\n    from pipeline import data\n")
    assert [module for _, module in imported_modules(package / "hidden.py")] == ["torch", "pipeline"]


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
