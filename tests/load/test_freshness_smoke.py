"""``bench.freshness`` runs end to end: a smoke test of the benchmark, not a benchmark.

A couple of seconds of probes on ``orderstream api`` + ``orderstream project`` (SQLite)
while wrk paces a few orders per second: every probe order must become findable by its
token through ``GET /orders?q=...&min_position=...`` and every paced POST must be a 201.
Nothing here looks at speed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from bench.freshness import run_store

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)"
)


def test_probes_become_queryable_under_paced_load(tmp_path: Path) -> None:
    args = argparse.Namespace(rates=[20.0], seconds=2.0, probe_every=0.2, connections=4, py_spy=None)

    rows = run_store("SQLite", (), args, tmp_path)

    assert [row.rate for row in rows] == [0.0, 20.0]  # the idle reference, then the load
    for row in rows:
        assert len(row.probes) == 10
        assert all(probe.queryable is not None for probe in row.probes), [p.statuses for p in row.probes]
        assert all(probe.queryable >= probe.post for probe in row.probes if probe.queryable is not None)
    loaded = rows[1].load
    assert loaded is not None
    assert loaded.statuses.get(201, 0) > 0
    assert loaded.non_2xx == 0, loaded.statuses
