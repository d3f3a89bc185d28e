"""The split topology counts the sagas where Prometheus can see them.

``orderstream api``, ``orderstream project`` and ``orderstream worker`` as processes
of their own (docker-compose.yml's shape), on one SQLite data dir; the worker runs
its own Temporal dev server. Before the metrics port, the API's ``/metrics`` was the
only one, and it showed 0 saga starts, 0 outcomes and no saga command after
thousands of sagas: they ran in the worker, which listened on no port. Now
``worker`` and ``project`` are given a metrics port and an order placed through
the API is counted where it was handled: ``PlaceOrder`` on the API's ``/metrics``,
the saga's start, its commands and its ``shipped`` outcome on the worker's port,
the projections' checkpoints on the projector's.

``multiprocess``: the worker runs the saga in a worker process of its own
(``ORDERSTREAM_SAGA_WORKER_PROCESSES=1``), so its port must answer with the sum over
the shared directory; the port comes from the environment, which that child
inherits, so the child must not try to open it too (it would fail, be restarted
again and again, and no saga would run).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.served import ROOT, Served, cli_env, free_port, running
from tests.tokens import token_for

WAIT = 90.0


@contextlib.contextmanager
def started(
    tmp_path: Path, name: str, args: list[str], ready_url: str, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """``orderstream ARGS`` on the shared data dir until ``ready_url`` answers 200."""
    argv = [sys.executable, "-m", "orderstream.cli", *args, "--data-dir", str(tmp_path / "data")]
    with running(argv, tmp_path / f"{name}.log", ready_url, name=name, env=env) as process:
        yield process


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in an exposition text (labels in any order)."""
    for line in text.splitlines():
        found = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if found is None or found.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
        if have == labels:
            return float(found.group(3))
    return None


def scrape_until(url: str, wanted: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    """Scrape ``url`` until every wanted sample has its value; the last answer."""
    deadline = time.monotonic() + WAIT
    while True:
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        got = {key: sample(response.text, key[0], **dict(key[1])) for key in wanted}
        if got == wanted:
            return response.text
        assert time.monotonic() < deadline, f"{url}: wanted {wanted}, got {got}"
        time.sleep(0.5)


def want(name: str, value: float, **labels: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], float]:
    return (name, tuple(sorted(labels.items()))), value


@pytest.mark.temporal
@pytest.mark.parametrize("saga_processes", ["0", "1"], ids=["one-process", "multiprocess"])
def test_the_worker_and_the_projector_count_on_their_ports(tmp_path: Path, saga_processes: str) -> None:
    api_port, worker_port, projector_port = free_port(), free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
    projector_metrics = f"http://127.0.0.1:{projector_port}/metrics"
    worker_env = cli_env(
        ORDERSTREAM_METRICS_PORT=str(worker_port),  # inherited by its saga worker process
        ORDERSTREAM_SAGA_WORKER_PROCESSES=saga_processes,
        ORDERSTREAM_TEMPORAL_DEV_PORT=str(free_port()),
        ORDERSTREAM_TEMPORAL_UI_PORT=str(free_port()),
    )
    with (
        started(tmp_path, "worker", ["worker"], worker_metrics, worker_env),
        started(
            tmp_path,
            "projector",
            ["project", "--metrics-port", str(projector_port)],
            projector_metrics,
            cli_env(),
        ),
        started(
            tmp_path,
            "api",
            ["api", "--port", str(api_port), "--workers", "1"],
            f"{api_url}/health",
            cli_env(),
        ) as api,
    ):
        served = Served(api_url, tmp_path / "api.log", api, token_for(tmp_path / "data"), "")
        with served.client() as client:
            served.place_and_ship(client, within=WAIT)
            api_text = client.get("/metrics").text

        assert sample(api_text, "orderstream_commands_total", command="PlaceOrder", result="accepted") == 1
        worker_text = scrape_until(
            worker_metrics,
            dict(
                [
                    want("orderstream_saga_starts_total", 1, saga="fulfilment"),
                    want("orderstream_saga_outcomes_total", 1, saga="fulfilment", outcome="shipped"),
                    want("orderstream_saga_outcomes_total", 0, saga="fulfilment", outcome="failed"),
                    want("orderstream_commands_total", 1, command="ReserveStock", result="accepted"),
                    want("orderstream_commands_total", 1, command="ShipOrder", result="accepted"),
                ]
            ),
        )
        # The saga trigger's gauges are refreshed on scrape, as the API's /metrics does.
        assert sample(worker_text, "orderstream_saga_trigger_parked") == 0
        assert sample(worker_text, "orderstream_saga_trigger_lag_events") is not None

        projector_text = scrape_until(
            projector_metrics,
            dict(
                [
                    want("orderstream_projection_lag_events", 0, projection="orders"),
                    want("orderstream_projection_parked", 0, projection="orders"),
                ]
            ),
        )
        checkpoint = sample(projector_text, "orderstream_projection_checkpoint", projection="orders")
        assert checkpoint is not None
        assert checkpoint > 0
        assert (sample(projector_text, "orderstream_writer_transactions_total") or 0) > 0

    # Only the first worker process listened: a child that had tried would have logged it.
    assert "cannot listen" not in (tmp_path / "worker.log").read_text()


def test_a_metrics_port_in_use_stops_the_process_before_it_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "orderstream.cli", "project", "--data-dir", str(tmp_path)],
            env=cli_env(ORDERSTREAM_METRICS_PORT=str(port)),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"metrics port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "events.db").exists(), "it opened the stores before it failed"
