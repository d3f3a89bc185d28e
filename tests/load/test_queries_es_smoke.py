"""``bench.queries --read-store es`` runs end to end: a smoke test, not a benchmark.

2,000 orders into Elasticsearch, one second of wrk per query on ``orderstream api`` and on
the node's ``_search``: every answer a 2xx, and the run's indices and templates gone
afterwards. Needs wrk and ``ORDERSTREAM_TEST_ES_URL``; nothing here looks at speed.
"""

from __future__ import annotations

import os
import re
import shutil

import httpx
import pytest

from bench import queries

ES_URL = os.environ.get("ORDERSTREAM_TEST_ES_URL")

pytestmark = [
    pytest.mark.elasticsearch,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)"),
    pytest.mark.skipif(not ES_URL, reason="needs ORDERSTREAM_TEST_ES_URL"),
]


def test_es_run_answers_every_query_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert ES_URL is not None
    queries.main(
        ["--read-store", "es", "--es-url", ES_URL, "--orders", "2000", "--seconds", "1", "--rounds", "2"]
    )

    out = capsys.readouterr().out
    rows = {
        case.name: line for case in queries.CASES for line in out.splitlines() if line.startswith(case.name)
    }
    assert set(rows) == {case.name for case in queries.CASES}
    for line in rows.values():
        numbers = line[28:].split()
        api_bad, direct_bad = int(numbers[3]), int(numbers[7])
        assert (api_bad, direct_bad) == (0, 0), line
        assert float(numbers[0]) > 0, line  # the API answered
        assert float(numbers[4]) > 0, line  # the node answered the recorded _search
    prefix = re.search(r"deleted the (\S+)\* indices", out)
    assert prefix is not None
    left = httpx.get(f"{ES_URL}/_cat/indices/{prefix.group(1)}*", params={"format": "json"})
    assert left.json() == []
