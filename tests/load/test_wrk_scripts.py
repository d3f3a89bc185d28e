"""The wrk scripts of ``bench.load`` send requests the live service accepts.

A smoke test of the load generator, not a benchmark: each script runs for a
couple of seconds against a real ``orderstream api`` (with ``orderstream
project`` beside it, so reads find the orders) and every answer must be a 2xx
or an expected 4xx, never a 5xx; a 422 would mean a script builds invalid
bodies. Nothing here looks at speed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import EXPECTED_4XX, Setup, WrkResult, catalogue, free_port, run_wrk, run_wrk_until_done, seed

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)"
)

OPTIONS = {"connections": 8, "threads": 2}


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp("load")
    setup = Setup(workdir)
    data_dir = setup.data_dir()
    api = setup.orderstream("api", data_dir, free_port())
    projector = setup.orderstream("project", data_dir, None)
    try:
        api.start()
        projector.start()
        seed(api.url, catalogue())
        yield api.url
    finally:
        projector.stop()
        api.stop()


def assert_sane(result: WrkResult) -> None:
    assert result.server_errors == 0, result.statuses
    assert result.unexpected == 0, result.statuses
    assert result.figures["socket_errors"] == 0, result.figures


def test_place_script_places_orders(api_url: str) -> None:
    result = run_wrk("place", "place", api_url, seconds=2, **OPTIONS, args={"tag": "smoke-place"})
    assert_sane(result)
    assert set(result.statuses) == {201}
    assert result.statuses[201] > 0


def test_mixed_script_sends_every_kind_validly(api_url: str) -> None:
    result = run_wrk("mixed", "mixed", api_url, seconds=3, **OPTIONS, args={"tag": "smoke-mixed"})
    assert_sane(result)
    sent = result.figures["sent"]
    assert set(sent) == {"place", "get", "search", "change", "cancel"}, sent
    # A 404 can only be a GET of an order the projection has not reached yet, and a 409
    # a change or cancel racing another on the same order.
    assert result.statuses.get(404, 0) <= sent["get"]
    assert result.statuses.get(409, 0) <= sent["change"] + sent["cancel"]
    assert set(result.statuses) <= {200, 201, *EXPECTED_4XX}
    assert result.statuses[200] > 0
    assert result.statuses[201] > 0


def test_burst_script_sends_exactly_its_orders(api_url: str) -> None:
    seed(api_url, {"SMOKE-BURST": 5})
    result = run_wrk_until_done(
        "burst",
        "burst",
        api_url,
        threads=2,
        connections=20,
        args={"tag": "smoke-burst", "sku": "SMOKE-BURST", "orders": 10},
    )
    assert_sane(result)
    assert result.statuses == {201: 20}
    assert result.figures["sent"] == {"place": 20}


def test_paced_script_keeps_its_rate(api_url: str) -> None:
    result = run_wrk(
        "paced", "paced", api_url, seconds=2, **OPTIONS, args={"tag": "smoke-paced", "rate": 20, "threads": 2}
    )
    assert_sane(result)
    assert set(result.statuses) == {201}
    # 20/s for 2 s: at most about 40 orders, where the unpaced place script sends hundreds.
    assert 0 < result.figures["sent"]["place"] <= 50
