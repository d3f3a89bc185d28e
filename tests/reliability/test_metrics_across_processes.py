"""``/metrics`` counts every process of ``serve`` by default (issue 10 item 3).

On 2+ cores ``serve`` runs 2 API worker processes and a saga worker process; a
scrape reaches one API worker. Without setting anything, the first process
points them all at a fresh directory in memory (prometheus_client's
multiprocess mode), so every scrape shows the commands of every process: the
order placed through one API worker and the saga's ``ShipOrder``, run by the
saga worker process. One process alone keeps the in-memory registry; the
directory is gone after ``serve`` stops.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.served import served

pytestmark = pytest.mark.temporal

SCRAPES = 8


def _accepted(text: str, command: str) -> float:
    found = re.search(
        rf'^orderstream_commands_total{{command="{command}",result="accepted"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def _shared_directory(log: Path) -> Path | None:
    found = re.search(r"every process of this service counts into (\S+?)\"", log.read_text())
    return Path(found.group(1)) if found else None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="serve runs one process below 2 cores")
def test_every_scrape_counts_the_commands_of_every_process(tmp_path: Path) -> None:
    with served(tmp_path, workers=None) as serve, serve.client() as client:
        serve.place_and_ship(client)
        for _ in range(SCRAPES):  # new connections: the kernel spreads them over the API workers
            response = client.get("/metrics", headers={"Connection": "close"})
            assert response.status_code == 200, response.text
            assert _accepted(response.text, "PlaceOrder") == 1, "an API worker's command is missing"
            assert _accepted(response.text, "ShipOrder") == 1, "the saga worker's command is missing"
        shared = _shared_directory(serve.log)
        assert shared is not None
        pids = {f.stem.rsplit("_", 1)[-1] for f in shared.glob("*.db")}
        assert len(pids) >= 3, pids  # the first process, the API workers, the saga worker
    assert not shared.exists()


def test_one_process_keeps_its_metrics_in_memory(tmp_path: Path) -> None:
    extra = {"ORDERSTREAM_SAGA_WORKER_PROCESSES": "0"}
    with served(tmp_path, workers=1, extra_env=extra) as serve, serve.client() as client:
        serve.place_and_ship(client)
        text = client.get("/metrics").text
        assert _accepted(text, "PlaceOrder") == 1
        assert _accepted(text, "ShipOrder") == 1
        assert _shared_directory(serve.log) is None
