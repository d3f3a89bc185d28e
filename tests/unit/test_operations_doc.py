"""docs/operations.md stays true to the code: its problem type catalogue lists every
``type`` URN the API can answer with, and its metric table every metric ``/metrics``
exposes."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import orderstream
from orderstream.api import problems
from orderstream.application.snapshots import SnapshotStore
from orderstream.domain.common import DomainError
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")

# Where a problem code is a literal argument: the helper and the argument's index.
CODE_ARGUMENT = {"bad_request": 0, "unprocessable": 0, "ApiError": 1, "problem_response": 2}


def _domain_error_codes() -> set[str]:
    for module in pkgutil.walk_packages(orderstream.__path__, "orderstream."):
        importlib.import_module(module.name)
    codes: set[str] = set()
    pending: list[type[DomainError]] = [DomainError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return codes


def _literal_codes() -> set[str]:
    """Codes passed as string literals to the problem helpers anywhere in the package
    (the API, and the auth guard that raises its own problems)."""
    codes: set[str] = set()
    for path in (ROOT / "src" / "orderstream").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            index = CODE_ARGUMENT.get(str(name))
            if index is not None and len(node.args) > index:
                argument = node.args[index]
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    codes.add(argument.value)
    return codes


def defined_codes() -> set[str]:
    return set(problems._TITLES) | _domain_error_codes() | _literal_codes()


def test_the_catalogue_lists_every_problem_type_the_code_defines() -> None:
    documented = set(re.findall(r"`urn:orderstream:problem:([a-z0-9-]+)`", DOC))
    codes = defined_codes()
    assert {"stale-revision", "insufficient-stock", "nothing-to-change", "unavailable"} <= codes
    missing = sorted(problems.problem_type(code) for code in codes - documented)
    assert not missing, f"docs/operations.md does not list: {missing}"


async def test_the_metric_table_lists_every_exported_metric(tmp_path: Path) -> None:
    metrics = Metrics()
    async with await SqliteEventStore.open(tmp_path / "events.db") as store:
        metrics.watch(store, SnapshotStore(store))  # the counters read from the stores too
        exported = {family.name for family in metrics.registry.collect()}
    assert "orderstream_writer_transactions" in exported
    documented = set(re.findall(r"`(orderstream_[a-z_]+)`", DOC))
    missing = sorted(
        name for name in exported if name not in documented and f"{name}_total" not in documented
    )
    assert not missing, f"docs/operations.md does not list: {missing}"
