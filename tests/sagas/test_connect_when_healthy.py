"""``serve`` connects to the dev server it started only once its frontend answers:
the port accepts connections before that ("Frontend is not healthy yet"), and a dev
server started at a lower CPU priority on a busy machine takes longer to get there
(seen once in the suite: ``serve`` exited 1). Here the retries are shown on a port
where nothing answers: attempts until ``within`` runs out, then the SDK's error."""

from __future__ import annotations

import socket
import time

import pytest

from orderstream.sagas.runtime import connect_when_healthy


async def test_a_server_that_never_becomes_healthy_fails_after_the_time_given() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Failed client connect"):
        await connect_when_healthy(f"127.0.0.1:{port}", within=1.0)
    assert 1.0 <= time.monotonic() - started < 10
