"""The metrics port's application (``orderstream.api.metrics_port``), in process: what it
answers, and that ``ORDERSTREAM_METRICS_PUBLIC=false`` guards it as it guards the API's
``/metrics``. tests/reliability/test_metrics_port.py runs it in real processes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderstream.api.metrics_port import MetricsApp
from orderstream.bootstrap import build
from orderstream.cli import metrics_address
from orderstream.config import ConfigError, Settings
from tests.tokens import bearer, token_for


@contextlib.asynccontextmanager
async def port_client(tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    container = await build(Settings(data_dir=tmp_path, **settings))
    try:
        transport = httpx.ASGITransport(app=MetricsApp.for_settings(container))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://metrics.test") as client:
            yield client
    finally:
        await container.close()


async def test_it_answers_the_process_metrics_with_the_gauges_refreshed(tmp_path: Path) -> None:
    async with port_client(tmp_path) as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'orderstream_saga_outcomes_total{outcome="failed",saga="fulfilment"} 0.0' in response.text
        # Set on scrape, as by the API's /metrics: -1 is "nothing applied yet".
        assert 'orderstream_projection_checkpoint{projection="orders"} -1.0' in response.text

        # prometheus_client's own exposition: OpenMetrics on request, name filters.
        open_metrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
        assert open_metrics.text.endswith("# EOF\n")
        only = await client.get("/metrics", params={"name[]": "orderstream_saga_starts_total"})
        assert "orderstream_saga_starts_total" in only.text
        assert "orderstream_commands" not in only.text


async def test_it_answers_nothing_else(tmp_path: Path) -> None:
    async with port_client(tmp_path) as client:
        other = await client.get("/orders")
        assert other.status_code == 404
        assert other.json()["type"] == "urn:orderstream:problem:no-such-route"
        post = await client.post("/metrics")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"


async def test_public_by_default_without_a_token(tmp_path: Path) -> None:
    async with port_client(tmp_path) as client:
        assert (await client.get("/metrics")).status_code == 200


async def test_behind_the_admin_role_when_metrics_are_not_public(tmp_path: Path) -> None:
    async with port_client(tmp_path, metrics_public=False) as client:
        anonymous = await client.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        assert "orderstream_" not in anonymous.text
        forged = await client.get("/metrics", headers=bearer("not.a.token"))
        assert forged.status_code == 401
        support = await client.get("/metrics", headers=bearer(token_for(tmp_path, "support")))
        assert support.status_code == 403
        admin = await client.get("/metrics", headers=bearer(token_for(tmp_path)))
        assert admin.status_code == 200
        assert "orderstream_saga_starts_total" in admin.text


async def test_no_token_asked_with_auth_off(tmp_path: Path) -> None:
    async with port_client(tmp_path, metrics_public=False, auth_enabled=False) as client:
        assert (await client.get("/metrics")).status_code == 200


def test_the_settings() -> None:
    assert Settings.from_env({}).metrics_port is None
    assert metrics_address(Settings.from_env({})) is None
    settings = Settings.from_env({"ORDERSTREAM_METRICS_PORT": "9100"})
    assert metrics_address(settings) == ("127.0.0.1", 9100)
    given = Settings.from_env(
        {"ORDERSTREAM_METRICS_PORT": "9100", "ORDERSTREAM_METRICS_HOST": "0.0.0.0"}, metrics_port=9200
    )
    assert metrics_address(given) == ("0.0.0.0", 9200)
    # A process another one started inherits the variable, not the port.
    assert metrics_address(settings, worker_of=1234) is None


@pytest.mark.parametrize("raw", ["ninety", "-1", "65536"])
def test_a_bad_port_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(ConfigError, match="ORDERSTREAM_METRICS_PORT"):
        Settings.from_env({"ORDERSTREAM_METRICS_PORT": raw})
