"""The stand-in against what kurrentdbclient's own test suite asserts of a real server
(``tests/test_client.py`` of github.com/pyeventsourcing/kurrentdbclient; each test names
the one it restates, in our words). These check the stand-in, not orderstream: if
one fails, the stand-in drifted from the documented server behaviour."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from kurrentdbclient import AsyncKurrentDBClient, NewEvent, RecordedEvent, StreamState
from kurrentdbclient.exceptions import NotFoundError, WrongCurrentVersionError

from tests.kurrentdb_standin import StandIn

pytestmark = pytest.mark.kurrentdb_standin


@pytest.fixture(scope="module")
def standin() -> AsyncIterator[StandIn]:  # type: ignore[misc]
    server = StandIn().start()
    yield server
    server.stop()


@pytest.fixture
async def client(standin: StandIn) -> AsyncIterator[AsyncKurrentDBClient]:
    raw = AsyncKurrentDBClient(standin.uri)
    await raw.connect()
    yield raw
    await raw.close()


def new(type_: str = "Happened") -> NewEvent:
    return NewEvent(type=type_, data=b"{}")


async def test_appends_return_the_last_events_position_and_repeat_it_when_idempotent(
    client: AsyncKurrentDBClient,
) -> None:
    """test_stream_append_to_stream, test_stream_append_event_with_current_version."""
    stream = str(uuid.uuid4())
    e1, e2, e3 = new(), new(), new()
    p1 = await client.append_to_stream(stream, events=[e1], current_version=StreamState.NO_STREAM)
    p2 = await client.append_to_stream(stream, events=[e2, e3], current_version=0)

    read = [e async for e in await client.read_all(commit_position=p1, filter_exclude=())]
    assert [e.id for e in read[:3]] == [e1.id, e2.id, e3.id]  # from p1, inclusive
    assert read[0].commit_position == p1
    assert read[2].commit_position == p2
    assert read[1].commit_position < read[2].commit_position

    again = [e1, e2]
    assert await client.append_to_stream(stream, events=again, current_version=StreamState.NO_STREAM) == (
        read[1].commit_position
    )
    assert await client.append_to_stream(stream, events=[e2, e3], current_version=0) == p2
    assert len(await client.get_stream(stream)) == 3


async def test_a_catch_up_subscription_starts_after_its_position(client: AsyncKurrentDBClient) -> None:
    """test_subscribe_to_all_from_commit_position_current."""
    stream = str(uuid.uuid4())
    e1, e2, e3 = new(), new(), new()
    p1 = await client.append_to_stream(stream, events=[e1], current_version=StreamState.NO_STREAM)
    await client.append_to_stream(stream, events=[e2, e3], current_version=0)
    subscription = await client.subscribe_to_all(commit_position=p1)
    got: list[RecordedEvent] = []
    async with asyncio.timeout(5):
        async for event in subscription:
            got.append(event)
            if event.id == e3.id:
                break
    await subscription.stop()
    assert [e.id for e in got] == [e2.id, e3.id]


async def test_soft_delete(client: AsyncKurrentDBClient) -> None:
    """test_stream_delete_with_any_current_version."""
    stream = str(uuid.uuid4())
    with pytest.raises(NotFoundError):
        await client.delete_stream(stream, current_version=StreamState.ANY)
    await client.append_to_stream(stream, events=[new()], current_version=StreamState.NO_STREAM)
    await client.append_to_stream(stream, events=[new()], current_version=0)
    await client.delete_stream(stream, current_version=StreamState.ANY)
    await client.delete_stream(stream, current_version=StreamState.ANY)  # again: no error
    with pytest.raises(NotFoundError):
        await client.get_stream(stream)
    assert await client.get_current_version(stream) is StreamState.NO_STREAM
    with pytest.raises(WrongCurrentVersionError):
        await client.append_to_stream(stream, events=[new()], current_version=0)
    after = new()
    await client.append_to_stream(stream, events=[after], current_version=1)
    assert [e.id for e in await client.get_stream(stream)] == [after.id]


async def _group_with_three_events(
    client: AsyncKurrentDBClient, **settings: float
) -> tuple[str, list[NewEvent]]:
    group = f"g-{uuid.uuid4().hex}"
    await client.create_subscription_to_all(group, from_end=True, **settings)  # type: ignore[call-overload]
    events = [new("OrderCreated"), new("OrderUpdated"), new("OrderDeleted")]
    await client.append_to_stream(str(uuid.uuid4()), events=events, current_version=StreamState.NO_STREAM)
    return group, events


async def test_a_timed_out_event_comes_back_first_with_a_buffer_of_one(client: AsyncKurrentDBClient) -> None:
    """test_subscription_to_all_read_with_message_timeout_event_buffer_size_1."""
    group, (e1, e2, e3) = await _group_with_three_events(client, message_timeout=1)
    subscription = await client.read_subscription_to_all(group, event_buffer_size=1, max_ack_batch_size=1)
    got: list[RecordedEvent] = []
    async with asyncio.timeout(10):
        async for event in subscription:
            got.append(event)
            if event.id == e1.id and event.retry_count == 0:
                continue
            await subscription.ack(event)
            if len(got) == 4:
                break
    await subscription.stop()
    assert [e.id for e in got] == [e1.id, e1.id, e2.id, e3.id]
    assert got[1].retry_count == 1


async def test_an_event_is_parked_after_max_retry_count_plus_one_deliveries(
    client: AsyncKurrentDBClient,
) -> None:
    """test_subscription_to_all_read_with_max_retry_count_3: four deliveries, then parked."""
    group, (e1, e2, e3) = await _group_with_three_events(client, message_timeout=0.1, max_retry_count=3)
    subscription = await client.read_subscription_to_all(group, event_buffer_size=1)
    got: list[RecordedEvent] = []
    async with asyncio.timeout(10):
        async for event in subscription:
            got.append(event)
            if event.id != e1.id:
                await subscription.ack(event)
            if len(got) == 6:
                break
    await subscription.stop()
    assert [e.id for e in got] == [e1.id] * 4 + [e2.id, e3.id]
    info = await client.get_subscription_info(group)
    assert info.parked_message_count == 1


async def test_parked_events_are_replayed_through_their_links(client: AsyncKurrentDBClient) -> None:
    """test_subscription_to_all_read_with_nack_park, test_subscription_to_all_replay_parked."""
    group, events = await _group_with_three_events(client)
    subscription = await client.read_subscription_to_all(group)
    async with asyncio.timeout(10):
        parked = 0
        async for event in subscription:
            await subscription.nack(event, action="park")
            parked += 1
            if parked == 3:
                break
        await asyncio.sleep(0.5)
        await client.replay_parked_events(group)
        replayed: list[RecordedEvent] = []
        async for event in subscription:
            await subscription.ack(event)
            replayed.append(event)
            if len(replayed) == 3:
                break
    await subscription.stop()
    assert [e.id for e in replayed] == [e.id for e in events]
    assert all(e.link is not None and e.ack_id == e.link.id for e in replayed)
