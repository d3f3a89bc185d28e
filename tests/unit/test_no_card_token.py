"""Card tokens stored in clear by older versions go no further than the stored
bytes: not into the domain, the saga or ``orderstream events read`` (issue 9 item 5)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from click.testing import CliRunner

from orderstream import cli
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.domain import orders
from orderstream.events import registry
from orderstream.eventstore.base import NO_STREAM, NewEvent

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "events"
ORDER = "3f9a0e55-71c2-4b8e-8d64-0c1d2e3f4a5b"


def store_old_order(data_dir: Path) -> None:
    """An ``OrderPlaced`` v3 as the previous version wrote it: token in clear."""

    async def go() -> None:
        container = await build(Settings(data_dir=data_dir))
        try:
            old = NewEvent(
                id=uuid.uuid4(),
                type="OrderPlaced",
                data=(FIXTURES / "OrderPlaced.v3.json").read_bytes(),
                schema_version=3,
            )
            await container.event_store.append(orders.stream_name(ORDER), [old], NO_STREAM)
            stored = await container.event_store.read_stream(orders.stream_name(ORDER))
            assert b"tok_approve" in stored[0].data  # the old bytes stay as they are...
            assert registry.decode(stored[0]).payment_method_id == ""  # ...but are not read back
        finally:
            await container.close()

    asyncio.run(go())


def test_events_read_redacts_a_token_stored_by_an_old_version(tmp_path: Path) -> None:
    store_old_order(tmp_path)
    result = CliRunner().invoke(
        cli.main, ["events", "read", orders.stream_name(ORDER), "--data-dir", str(tmp_path)], env={}
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert (line["type"], line["schema_version"]) == ("OrderPlaced", 3)
    assert line["data"]["payment_token"] == "[redacted]"
    assert "tok_" not in result.output
