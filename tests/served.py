"""A real ``orderstream serve`` in a process of its own, for tests that look at it
from outside (its log, its ``/metrics``): embedded SQLite stores in a temporary
directory, its own Temporal dev server on free ports, one API process by default
(``--workers 1``), JSON logs into a file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.api.helpers import order_body
from tests.tokens import token_for

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without ORDERSTREAM_/TEMPORAL_ settings, able to import the
    checkout's ``orderstream`` and ``tests``, logging JSON unbuffered; plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERSTREAM_", "TEMPORAL_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
        ORDERSTREAM_LOG_FORMAT="json",
        **extra,
    )
    return env


@contextlib.contextmanager
def running(
    argv: list[str],
    log: Path,
    ready_url: str,
    *,
    name: str,
    env: dict[str, str],
    wait: float = 90,
    stdout_in_log: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with its stderr (and stdout, unless ``stdout_in_log`` is false: then
    it is dropped) in ``log`` until ``ready_url`` answers 200; yield the process; then
    SIGTERM it and wait for its graceful stop (60 s, else SIGKILL)."""
    with log.open("wb") as out:
        stdout = out if stdout_in_log else subprocess.DEVNULL
        process = subprocess.Popen(argv, stdout=stdout, stderr=out, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + wait
        while True:
            assert process.poll() is None, f"{name} exited with {process.returncode}; see {log}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"{name}: {ready_url} did not answer in {wait} s; see {log}"
            time.sleep(0.3)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Served:
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    token: str
    """An admin bearer token of the served process's local issuer; no log line may hold it."""
    web_ui: str
    """The Web UI of its embedded Temporal dev server."""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.token}"})

    def place_and_ship(self, client: httpx.Client, *, token: str = "tok_approve", within: float = 60) -> str:
        """Place an order (a product and stock first, if needed) and wait until it shipped."""
        if client.get("/products/MUG").status_code == 404:
            created = client.post(
                "/products", json={"sku": "MUG", "name": "Mug", "price": {"amount": 900, "currency": "EUR"}}
            )
            assert created.status_code == 201, created.text
        stocked = client.post("/products/MUG/stock", json={"quantity": 5})
        assert stocked.status_code == 200, stocked.text
        placed = client.post("/orders", json=order_body(("MUG", 1), token=token))
        assert placed.status_code == 201, placed.text
        order_id = str(placed.json()["id"])
        deadline = time.monotonic() + within
        status: Any = None
        while time.monotonic() < deadline:
            status = client.get(f"/orders/{order_id}").json().get("status")
            if status == "shipped":
                return order_id
            time.sleep(0.2)
        raise AssertionError(f"order {order_id} is {status!r} after {within} s; see {self.log}")


@contextlib.contextmanager
def served(
    tmp_path: Path,
    *,
    log_level: str = "info",
    workers: int | None = 1,
    extra_env: dict[str, str] | None = None,
    temporal_port: int | None = None,
) -> Iterator[Served]:
    """Start ``orderstream serve``, yield once ``/health`` answers, then SIGTERM it and
    wait for its graceful shutdown (Temporal dev server included). ``workers=None``:
    serve's default (2 API worker processes and a saga worker process on 2+ cores).
    ``temporal_port``: its dev server's port (default: a free one)."""
    port, ui_port = free_port(), free_port()
    env = cli_env(
        ORDERSTREAM_TEMPORAL_DEV_PORT=str(temporal_port or free_port()),
        ORDERSTREAM_TEMPORAL_UI_PORT=str(ui_port),
        **(extra_env or {}),
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "orderstream.cli", "serve", "--port", str(port)]
    argv += [] if workers is None else ["--workers", str(workers)]
    argv += ["--data-dir", str(tmp_path / "data"), "--log-level", log_level]
    url = f"http://127.0.0.1:{port}"
    with running(argv, log, f"{url}/health", name="serve", env=env, stdout_in_log=False) as process:
        yield Served(url, log, process, token_for(tmp_path / "data"), f"http://localhost:{ui_port}")
