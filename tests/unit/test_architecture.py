"""The import graph's rules (``[tool.importlinter]`` in pyproject.toml), checked with
import-linter: the core never imports the saga package, the domain imports nothing
of the application, the API or the infrastructure.

The contracts name the core's modules one by one, so a test also checks that every
module of ``orderstream`` is named there or is the saga package or the composition
root; and one breaks the rule in a copy of the sources to show that the check fails."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import orderstream

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
COMPOSITION_ROOT = {"orderstream.bootstrap", "orderstream.cli"}
SAGAS = "orderstream.sagas"


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def lint_imports(cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT, [ROOT / "src", ROOT])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_every_module_of_orderstream_is_core_saga_or_composition_root() -> None:
    core = set(contracts()["core-without-sagas"]["source_modules"])
    modules = {f"orderstream.{m.name}" for m in pkgutil.iter_modules(orderstream.__path__)}
    unclassified = modules - core - COMPOSITION_ROOT - {SAGAS}
    assert not unclassified, f"add these to the core's contract in pyproject.toml: {sorted(unclassified)}"
    assert core - {"projections"} <= modules, "the contract names a module that is gone"


def test_a_core_module_importing_the_saga_breaks_the_contract(tmp_path: Path) -> None:
    """The rule is not vacuous: the same check over a copy of the sources where the
    command handler imports the saga package fails, naming the import."""
    shutil.copytree(ROOT / "src" / "orderstream", tmp_path / "src" / "orderstream")
    shutil.copytree(ROOT / "projections", tmp_path / "projections")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    commands = tmp_path / "src" / "orderstream" / "application" / "commands.py"
    commands.write_text(commands.read_text(encoding="utf-8") + "\nimport orderstream.sagas  # noqa\n")

    result = lint_imports(tmp_path, [tmp_path / "src", tmp_path])

    assert result.returncode != 0
    assert "orderstream.application.commands -> orderstream.sagas" in result.stdout
    assert "1 kept, 1 broken" in result.stdout
