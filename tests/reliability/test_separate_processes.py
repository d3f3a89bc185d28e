"""Two ``orderstream project`` processes share one persistent subscription group per
projection: every event is applied, none twice, also when one of them is killed.

The event store is the embedded SQLite file (its groups live in the file, so
processes share them) and KurrentDB, here the protocol STAND-IN run as a process of
its own (``python -m tests.kurrentdb_standin``; marked ``kurrentdb_standin``); the read
store is SQLite and, when a node is given, the real Elasticsearch node, the production
pairing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from orderstream.application.commands import CommandContext
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from orderstream.domain.common import Money
from tests.contract.conftest import ES_HOW, drop_es_prefix

ROOT = Path(__file__).resolve().parents[2]
SKUS = [f"SKU-{i}" for i in range(6)]


@pytest.fixture(params=["sqlite", "elasticsearch"])
async def read_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/read.db"
        return
    url = os.environ.get("ORDERSTREAM_TEST_ES_URL")
    if not url:
        pytest.skip(ES_HOW)
    prefix = f"procs-{uuid.uuid4().hex[:10]}-"
    yield f"{url.rstrip('/')}?prefix={prefix}"
    await drop_es_prefix(url, prefix)


@pytest.fixture(params=["sqlite", pytest.param("kurrentdb", marks=pytest.mark.kurrentdb_standin)])
def event_store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``""`` (the embedded SQLite file), or a KurrentDB stand-in in its own process."""
    if request.param == "sqlite":
        yield ""
        return
    standin = subprocess.Popen(
        [sys.executable, "-m", "tests.kurrentdb_standin", "--port", "0"],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert standin.stdout is not None
        ready = standin.stdout.readline().decode()  # "... listening on 127.0.0.1:PORT"
        assert "listening on" in ready, ready
        yield f"kurrentdb://{ready.split()[-1]}?tls=false"
    finally:
        standin.terminate()
        standin.wait(timeout=10)


@pytest.fixture
async def container(tmp_path: Path, read_store_url: str, event_store_url: str) -> AsyncIterator[Container]:
    built = await build(
        Settings(data_dir=tmp_path, read_store_url=read_store_url, event_store_url=event_store_url)
    )
    try:
        yield built
    finally:
        await built.close()


def projector(
    tmp_path: Path, read_store_url: str, name: str, event_store_url: str = ""
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERSTREAM_", "TEMPORAL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orderstream.cli",
            "project",
            "--data-dir",
            str(tmp_path),
            "--read-store",
            read_store_url,
            *(["--event-store", event_store_url] if event_store_url else []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


async def add_stock_in_rounds(container: Container, rounds: int) -> None:
    for i in range(rounds):
        await asyncio.gather(
            *(container.use_cases.add_stock(sku, i + 1, _context()) for sku in SKUS),
        )


def _context() -> CommandContext:
    return CommandContext(actor="test")


async def test_two_projector_processes_apply_every_event_once(
    container: Container, tmp_path: Path, read_store_url: str, event_store_url: str
) -> None:
    for sku in SKUS:
        await container.use_cases.register_product(sku, f"product {sku}", Money(100, "EUR"), _context())
    await add_stock_in_rounds(container, 10)

    first = projector(tmp_path, read_store_url, "first", event_store_url)
    second = projector(tmp_path, read_store_url, "second", event_store_url)
    try:
        # More events while both consume, then one dies without a goodbye.
        await add_stock_in_rounds(container, 10)
        await asyncio.sleep(1.0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        await add_stock_in_rounds(container, 10)

        head = await container.event_store.head_position()
        assert head is not None
        # The killed consumer's leases expire (ack timeout 30 s by default) and the
        # survivor takes its events over; both projections must reach the head.
        runner = container.runners["products"]
        assert await runner.wait_for_position(head, timeout=90), await runner.status()
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (first, second):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    assert second.returncode == 0, (tmp_path / "second.log").read_text()
    await container.read_store.refresh("products")
    expected_on_hand = 3 * sum(range(1, 11))  # three batches of rounds adding 1..10 units to every SKU
    for sku in SKUS:
        doc = await container.read_store.get("products", sku)
        assert doc is not None
        assert doc["on_hand"] == expected_on_hand, (sku, doc)
        revision = await container.event_store.stream_revision(f"product-{sku}")
        assert doc["revision"] == revision
    info = await container.event_store.subscription_group_info(runner.group)
    assert info.parked == 0
