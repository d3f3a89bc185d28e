"""A read store that hangs rather than refuses: Elasticsearch stopped (SIGSTOP, a long
GC, swapping). The kernel still completes its TCP handshakes, so a request is sent and
never answered; every read waited the client's 30 s for its 503 (hostile fault run).
A socket that listens and never reads is what such a node is to its clients."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from orderstream.readstore.base import Query, ReadStoreUnavailable
from orderstream.readstore.elasticsearch import ElasticsearchReadStore

READ_TIMEOUT = 1.0


@pytest.fixture
def hung_node() -> Iterator[str]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # never accepted, never answered
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


async def test_a_read_from_a_hung_node_is_an_outage_within_the_read_timeout(hung_node: str) -> None:
    store = await ElasticsearchReadStore.open(hung_node, read_timeout=READ_TIMEOUT)
    try:
        for read in (
            lambda: store.query("orders", Query(limit=10)),
            lambda: store.get("orders", "some-order"),
            lambda: store.alias_target("orders"),
        ):
            started = time.monotonic()
            with pytest.raises(ReadStoreUnavailable):
                await read()
            took = time.monotonic() - started
            assert took < READ_TIMEOUT + 2.0, took  # was the client's 30 s
    finally:
        await store.close()
