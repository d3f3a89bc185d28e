"""An operator's mistakes at start-up end in one line, and a port taken is refused
(hostile operations run, stop 19).

Before: a port in use, an address not on this machine, a data dir that cannot be
made, a store URL without a path, a full disk, a malformed ``TEMPORAL_ADDRESS``,
an out-of-range dev-server port or a projection command before any projection ran
each ended in a traceback of 45 to 161 lines; and a second ``serve`` or ``api
--workers N`` given a port a first one serves started without a word and took half
its connections (``SO_REUSEPORT``), so clients saw two services on two data dirs
behind one address.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.served import ROOT, cli_env, free_port, running


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.create_server(("127.0.0.1", 0)) as other:
        yield int(other.getsockname()[1])


def orderstream(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orderstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=cli_env(ORDERSTREAM_AUTH="off", **env),
        cwd=ROOT,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode in (1, 2), (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    plain = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    errors = [line for line in plain if line.startswith("Error:")]
    assert len(errors) == 1, plain
    assert says in errors[0], errors[0]
    assert len(plain) <= 3, plain  # the error, and at most click's usage lines


@pytest.mark.parametrize("command", [["api"], ["api", "--workers", "2"], ["serve", "--no-sagas"]])
def test_a_port_in_use_is_one_line(tmp_path: Path, taken_port: int, command: list[str]) -> None:
    result = orderstream(*command, "--port", str(taken_port), "--data-dir", str(tmp_path / "d"))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{taken_port}: Address already in use")


def test_an_address_not_on_this_machine_is_one_line(tmp_path: Path) -> None:
    result = orderstream("api", "--host", "192.0.2.1", "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert_one_line(result, "cannot listen on 192.0.2.1:0")


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["api", "--port", "0", "--data-dir", "{file}/data"], {}, "Not a directory"),
        (["api", "--port", "0"], {"ORDERSTREAM_EVENT_STORE": "sqlite:///"}, "not a SQLite file URL"),
        (["api", "--port", "0"], {"ORDERSTREAM_EVENT_STORE": "sqlite:////dev/full"}, "event store is full"),
        (["worker"], {"TEMPORAL_ADDRESS": "notahost::::"}, "TEMPORAL_ADDRESS: expected host:port"),
        (["worker"], {"ORDERSTREAM_TEMPORAL_DEV_PORT": "99999"}, "must be at most 65535"),
        (["projections", "skip", "orders", "1", "--reason", "x"], {}, "does not exist"),
    ],
)
def test_a_mistake_at_start_is_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    args = [arg.replace("{file}", str(a_file)) for arg in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(tmp_path / "d")]
    assert_one_line(orderstream(*args, **env), says)


def test_a_second_service_cannot_take_a_served_port(tmp_path: Path) -> None:
    """Two ``serve`` on one port: the second is refused, the first keeps every
    connection; a restart on the port right after a stop still works."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "orderstream.cli", "serve", "--no-sagas", "--workers", "2"]
    argv += ["--port", str(port)]
    env = cli_env(ORDERSTREAM_AUTH="off")
    first = [*argv, "--data-dir", str(tmp_path / "first")]
    with running(first, tmp_path / "first.log", f"{url}/health", name="first serve", env=env):
        for command in (["serve", "--no-sagas"], ["api", "--workers", "2"]):
            second = orderstream(*command, "--port", str(port), "--data-dir", str(tmp_path / "second"))
            assert_one_line(second, "Address already in use")
        # Every connection still reaches the first: each creates a product there.
        with httpx.Client(base_url=url, timeout=10) as client:
            position = 0
            for n in range(20):
                with httpx.Client(base_url=url, timeout=10) as fresh:  # a new connection each
                    body = {"sku": f"SKU-{n}", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}
                    created = fresh.post("/products", json=body)
                    assert created.status_code == 201, created.text
                    position = created.json()["position"]
            listed = client.get("/products", params={"min_position": position, "limit": 100})
            assert listed.status_code == 200, listed.text
            assert len(listed.json()["items"]) == 20
            keep_alive = httpx.Client(base_url=url, timeout=10)
            assert keep_alive.get("/health").status_code == 200  # open while the server stops
    keep_alive.close()
    # The stopped server closed its connections: they linger in TIME_WAIT on the port,
    # which must not look like a second service to the next start.
    again = [*argv, "--data-dir", str(tmp_path / "first")]
    with running(again, tmp_path / "again.log", f"{url}/health", name="serve again", env=env):
        assert httpx.get(f"{url}/products/SKU-19", timeout=10).status_code == 200  # the same data
