"""Settings from the environment, overridden by CLI options."""

from __future__ import annotations

from pathlib import Path

import pytest

from orderstream.bootstrap import open_event_store, open_read_store
from orderstream.config import ConfigError, Settings, sqlite_path


def test_defaults_follow_the_data_dir() -> None:
    settings = Settings.from_env({})
    assert settings.data_dir == Path("./data")
    assert settings.event_store_url == "sqlite:///data/events.db"
    assert settings.read_store_url == "sqlite:///data/read.db"
    assert settings.auth_enabled
    assert settings.auth_issuer is None  # the local issuer
    assert settings.auth_audience == "orderstream"
    assert settings.auth_roles_claim == "realm_access.roles"
    assert settings.auth_customer_claim == "customer_id"
    assert settings.metrics_public
    assert settings.write_rate_limit == "120/minute"
    assert settings.consistency_timeout == 5.0
    assert settings.max_body_bytes == 64 * 1024


def test_environment_and_overrides() -> None:
    env = {
        "ORDERSTREAM_DATA_DIR": "/srv/os",
        "ORDERSTREAM_READ_STORE": "http://127.0.0.1:9200",
        "TEMPORAL_ADDRESS": "127.0.0.1:7233",
        "ORDERSTREAM_AUTH_ISSUER": "http://127.0.0.1:8080/realms/orderstream",
        "ORDERSTREAM_AUTH_AUDIENCE": "orderstream-api",
        "ORDERSTREAM_AUTH_ROLES_CLAIM": "roles",
        "ORDERSTREAM_METRICS_PUBLIC": "false",
        "ORDERSTREAM_WRITE_RATE_LIMIT": "5/second",
        "ORDERSTREAM_CONSISTENCY_TIMEOUT": "2.5",
        "ORDERSTREAM_MAX_BODY_BYTES": "1024",
        "ORDERSTREAM_API_WORKERS": "3",
    }
    settings = Settings.from_env(env)
    assert settings.event_store_url == "sqlite:////srv/os/events.db"
    assert sqlite_path(settings.event_store_url) == Path("/srv/os/events.db")
    assert settings.read_store_url == "http://127.0.0.1:9200"
    assert settings.auth_issuer == "http://127.0.0.1:8080/realms/orderstream"
    assert settings.auth_audience == "orderstream-api"
    assert settings.auth_roles_claim == "roles"
    assert not settings.metrics_public
    assert settings.write_rate_limit == "5/second"
    assert settings.consistency_timeout == 2.5
    assert settings.max_body_bytes == 1024
    assert settings.api_workers == 3
    overridden = Settings.from_env(env, data_dir="/elsewhere", event_store_url=None, api_workers=2)
    assert overridden.api_workers == 2
    assert overridden.event_store_url == "sqlite:////elsewhere/events.db"
    assert "127.0.0.1:8080/realms/orderstream" in overridden.describe()["auth"]
    assert not Settings.from_env({"ORDERSTREAM_AUTH": "off"}).auth_enabled


@pytest.mark.parametrize(
    "env",
    [
        {"ORDERSTREAM_EVENT_STORE": "postgres://x"},
        {"ORDERSTREAM_READ_STORE": "ftp://x"},
        {"ORDERSTREAM_API_TOKENS": "t=alice"},  # gone: refused with what to use instead
        {"ORDERSTREAM_AUTH": "maybe"},
        {"ORDERSTREAM_AUTH_ISSUER": "keycloak"},
        {"ORDERSTREAM_WRITE_RATE_LIMIT": "lots"},
        {"ORDERSTREAM_WRITE_RATE_LIMIT": "0/minute"},
        {"ORDERSTREAM_CONSISTENCY_TIMEOUT": "soon"},
        {"ORDERSTREAM_CONSISTENCY_TIMEOUT": "0"},
        {"ORDERSTREAM_MAX_BODY_BYTES": "-1"},
        {"ORDERSTREAM_API_WORKERS": "-1"},
        {"ORDERSTREAM_API_WORKERS": "65"},
        {"ORDERSTREAM_HEADER_TIMEOUT": "0"},
        {"ORDERSTREAM_BODY_TIMEOUT": "slow"},
        {"ORDERSTREAM_SEND_TIMEOUT": "0"},
        {"ORDERSTREAM_MAX_CONNECTIONS": "-5"},
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert any(name in str(caught.value) for name in env) or "ORDERSTREAM" in str(caught.value)


async def test_backends_open_by_url(tmp_path: Path) -> None:
    events = await open_event_store(f"sqlite:///{tmp_path}/e.db")
    read = await open_read_store(f"sqlite:///{tmp_path}/r.db")
    try:
        assert await events.head_position() is None
        assert await read.alias_target("orders") is None
    finally:
        await read.close()
        await events.close()
    with pytest.raises(ConfigError):
        await open_event_store("mysql://nope")


def test_api_workers_auto_is_one_for_api_and_two_for_serve_given_two_cores() -> None:
    auto = Settings.from_env({})
    assert auto.workers_for(serve=False, cores=8) == 1
    assert auto.workers_for(serve=True, cores=2) == 2
    assert auto.workers_for(serve=True, cores=1) == 1
    chosen = Settings.from_env({"ORDERSTREAM_API_WORKERS": "3"})
    assert chosen.workers_for(serve=False, cores=1) == chosen.workers_for(serve=True, cores=1) == 3


def test_connection_limits_from_the_environment() -> None:
    env = {
        "ORDERSTREAM_HEADER_TIMEOUT": "3",
        "ORDERSTREAM_BODY_TIMEOUT": "2.5",
        "ORDERSTREAM_KEEP_ALIVE_TIMEOUT": "1",
        "ORDERSTREAM_SEND_TIMEOUT": "7",
        "ORDERSTREAM_MAX_CONNECTIONS": "500",
    }
    limits = Settings.from_env(env).connections
    assert (limits.header_timeout, limits.body_timeout, limits.keep_alive_timeout) == (3, 2.5, 1)
    assert limits.send_timeout == 7
    assert Settings.from_env({}).connections.send_timeout == 15
    assert limits.max_connections == 500
    assert Settings.from_env({}).connections.max_connections == 0  # auto: from the fd limit
