"""pyproject.toml declares every third-party package the code imports, at versions the installed ones meet."""

import ast
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCAL = {"ituning", "storage", "tasks", "flows", "tests", "benchmarks", "common", "pipeline", "cli"}


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    found = [Requirement(text) for text in listed]
    nested = [other for requirement in found if canonicalize_name(requirement.name) == "ituning"
              for other in requirement.extras]
    return [r for r in found if canonicalize_name(r.name) != "ituning"] + \
        [r for other in nested for r in requirements(other)]


def imported_modules(folders: list[str]) -> dict[str, str]:
    """Top-level module -> a file importing it, over every import (module level or inside functions)."""
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def undeclared(folders: list[str], declared: list[Requirement]) -> dict[str, str]:
    names = {canonicalize_name(requirement.name) for requirement in declared}
    distributions = packages_distributions()
    missing = {}
    for module, where in imported_modules(folders).items():
        if module in sys.stdlib_module_names or module in LOCAL:
            continue
        provided_by = {canonicalize_name(name) for name in distributions.get(module, [module])}
        if not provided_by & names:
            missing[module] = where
    return missing


def test_the_code_imports_only_declared_packages():
    assert undeclared(["ituning", "storage", "pipeline", "tasks", "flows", "cli"], requirements()) == {}


def test_tests_and_benchmarks_import_only_declared_or_dev_packages():
    assert undeclared(["tests", "benchmarks"], requirements() + requirements("dev")) == {}


@pytest.mark.parametrize("extra", [None, "dev"])
def test_installed_versions_meet_the_declared_ranges(extra):
    unmet = []
    for requirement in requirements(extra):
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            unmet.append(f"{requirement}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement}: {installed} installed")
    assert unmet == []
