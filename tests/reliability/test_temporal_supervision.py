"""``serve`` supervises the Temporal dev server it started (issue 12 item 1).

The dev server is killed with SIGKILL under a running ``serve``: ``serve`` stays
up, starts it again on the same ports and database file, ``/ready`` shows it
back (``sagas.temporal``: connected, the dev server running, one restart, how it
exited), and an order placed afterwards ships (the saga worker, in a process of
its own on 2+ cores, and the trigger reconnect by themselves).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderstream.sagas.dev_server import DevServerConfig, DevServerExited, SupervisedDevServer
from tests.served import served

pytestmark = pytest.mark.temporal


def _temporal(client: httpx.Client) -> dict[str, Any]:
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    return dict(ready.json()["sagas"]["temporal"])


def _until(client: httpx.Client, check: Any, within: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        temporal = _temporal(client)
        if check(temporal):
            return temporal
        assert time.monotonic() < deadline, f"{what}: {temporal}"
        time.sleep(0.2)


def _priorities(pid: int) -> set[int]:
    """The nice values of every thread of process ``pid``."""
    return {os.getpriority(os.PRIO_PROCESS, int(tid.name)) for tid in Path(f"/proc/{pid}/task").iterdir()}


def _saga_workers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"worker" in argv and b"--worker-of" in argv and str(pid).encode() in argv:
                found.append(int(entry.name))
    return found


def test_a_killed_dev_server_is_restarted_and_orders_still_ship(tmp_path: Path) -> None:
    with served(tmp_path) as serve, serve.client() as client:
        serve.place_and_ship(client)
        before = _temporal(client)
        assert before["status"] == "connected", before
        assert before["dev_server"]["status"] == "running", before
        assert before["dev_server"]["restarts"] == 0
        killed = before["dev_server"]["pid"]
        # The dev server and the saga worker process run below the API (ORDERSTREAM_SAGA_NICE: 10).
        below_serve = min(19, os.getpriority(os.PRIO_PROCESS, serve.process.pid) + 10)
        assert _priorities(killed) == {below_serve}  # every thread of the Go server
        workers = _saga_workers_of(serve.process.pid)
        assert workers, "serve started no saga worker process"
        assert all(_priorities(pid) == {below_serve} for pid in workers)

        os.kill(killed, signal.SIGKILL)
        down = _until(client, lambda t: t["status"] != "connected", 10, "the outage not seen")
        assert down["status"] == "unreachable", down
        assert down["last_error"]

        back = _until(
            client,
            lambda t: t["status"] == "connected" and t["dev_server"]["restarts"] == 1,
            60,
            "the dev server did not come back",
        )
        assert back["dev_server"]["status"] == "running"
        assert back["dev_server"]["pid"] not in (None, killed)
        assert _priorities(back["dev_server"]["pid"]) == {below_serve}  # at a restart too
        assert "exit status -9" in back["dev_server"]["last_exit"]

        serve.place_and_ship(client, within=90)
        assert serve.process.poll() is None
        log = serve.log.read_text()
        assert "exited (exit status -9" in log
        assert "is back at" in log


async def test_a_port_taken_by_another_process_is_refused_not_taken_for_ours() -> None:
    """A dev server left behind by a killed ``serve`` (or anything else) on the port:
    starting fails saying so, rather than talking to a server that is not ours."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SupervisedDevServer(DevServerConfig(port=taken.getsockname()[1], ui_port=None, db_file=None))
        with pytest.raises(DevServerExited, match="in use by another process"):
            await server.start()
        assert server.process is None
