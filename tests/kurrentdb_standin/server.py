"""gRPC services of the stand-in, on the server stubs that kurrentdbclient ships.

STAND-IN, NOT KURRENTDB. Only the calls orderstream's adapter makes are served:
``streams.Streams`` BatchAppend / Read / Delete, ``persistent_subscriptions.
PersistentSubscriptions`` Create / Delete / Read / GetInfo / ReplayParked, and
``gossip.Gossip`` Read (for ``kurrentdb+discover://``). Everything else answers
UNIMPLEMENTED (the generated servicer base class).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from google.protobuf import any_pb2, empty_pb2
from kurrentdbclient.protos.v1 import (
    gossip_pb2,
    gossip_pb2_grpc,
    persistent_pb2,
    persistent_pb2_grpc,
    shared_pb2,
    status_pb2,
    streams_pb2,
    streams_pb2_grpc,
)

from tests.kurrentdb_standin.groups import Consumer, Group, Message, Settings
from tests.kurrentdb_standin.log import (
    LINK_TYPE,
    Expect,
    Expectation,
    Log,
    Proposed,
    Record,
    RegexFilter,
    StreamNotFound,
    WrongVersion,
)

RecordedPb = streams_pb2.ReadResp.ReadEvent.RecordedEvent


def _recorded(record: Record, message_type: type = RecordedPb) -> object:
    return message_type(
        id=shared_pb2.UUID(string=str(record.id)),
        stream_identifier=shared_pb2.StreamIdentifier(stream_name=record.stream.encode()),
        stream_revision=record.revision,
        prepare_position=record.position,
        commit_position=record.position,
        metadata={"type": record.type, "content-type": record.content_type, "created": str(record.created)},
        custom_metadata=record.custom_metadata,
        data=record.data,
    )


def _read_event(log: Log, record: Record, *, resolve_links: bool) -> streams_pb2.ReadResp:
    """A link read with ``resolve_links`` carries its target as ``event`` and itself as
    ``link``; an unresolvable link comes back as a plain event (type ``$>``)."""
    target = log.resolve(record) if resolve_links and record.type == LINK_TYPE else None
    if target is None:
        read_event = streams_pb2.ReadResp.ReadEvent(event=_recorded(record), commit_position=record.position)
    else:
        read_event = streams_pb2.ReadResp.ReadEvent(
            event=_recorded(target), link=_recorded(record), commit_position=record.position
        )
    return streams_pb2.ReadResp(event=read_event)


def _expectation(options: object) -> Expectation:
    which = options.WhichOneof("expected_stream_revision")  # type: ignore[attr-defined]
    if which in ("revision", "stream_position"):
        return int(getattr(options, which))
    return {"no_stream": Expect.NO_STREAM, "any": Expect.ANY, "stream_exists": Expect.EXISTS}[which]


def _filter(filter_options: object) -> RegexFilter | None:
    which = filter_options.WhichOneof("filter")  # type: ignore[attr-defined]
    if which is None:
        return None
    expression = getattr(filter_options, which)
    pattern = re.compile(expression.regex) if expression.regex else None
    return RegexFilter(pattern, tuple(expression.prefix), by_stream_name=which == "stream_identifier")


class StreamsService(streams_pb2_grpc.StreamsServicer):
    def __init__(self, log: Log) -> None:
        self._log = log

    async def BatchAppend(
        self, request_iterator: AsyncIterator[streams_pb2.BatchAppendReq], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[streams_pb2.BatchAppendResp]:
        async for request in request_iterator:
            # The client sends one final request per append (is_final=True): one batch,
            # one atomic write, one reply.
            yield await self._append(request)

    async def _append(self, request: streams_pb2.BatchAppendReq) -> streams_pb2.BatchAppendResp:
        options = request.options
        stream = options.stream_identifier.stream_name.decode()
        expected = _expectation_batch(options)
        events = [
            Proposed(
                id=uuid.UUID(m.id.string),
                type=m.metadata["type"],
                content_type=m.metadata.get("content-type", "application/octet-stream"),
                data=m.data,
                custom_metadata=m.custom_metadata,
            )
            for m in request.proposed_messages
        ]
        reply = streams_pb2.BatchAppendResp(correlation_id=request.correlation_id)
        try:
            revision, position = self._log.append(stream, events, expected)
        except WrongVersion as exc:
            wrong = shared_pb2.WrongExpectedVersion()
            if exc.current is None:
                wrong.current_no_stream.CopyFrom(empty_pb2.Empty())
            else:
                wrong.current_stream_revision = exc.current
            details = any_pb2.Any()
            details.Pack(wrong)
            reply.error.CopyFrom(status_pb2.Status(code=9, message="Wrong expected version", details=details))
            return reply
        reply.success.current_revision = revision
        reply.success.position.CopyFrom(
            shared_pb2.AllStreamPosition(commit_position=position, prepare_position=position)
        )
        await self._log.notify()
        return reply

    async def Delete(
        self, request: streams_pb2.DeleteReq, context: grpc.aio.ServicerContext
    ) -> streams_pb2.DeleteResp:
        stream = request.options.stream_identifier.stream_name.decode()
        try:
            self._log.delete(stream, _expectation(request.options))
        except StreamNotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Stream '{stream}' not found")
        except WrongVersion:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Wrong expected version")
        await self._log.notify()
        return streams_pb2.DeleteResp()

    async def Read(
        self, request: streams_pb2.ReadReq, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[streams_pb2.ReadResp]:
        options = request.options
        if options.WhichOneof("stream_option") == "stream":
            for response in self._read_stream(options):
                yield response
            return
        event_filter = _filter(options.filter) if options.WhichOneof("filter_option") == "filter" else None
        if options.WhichOneof("count_option") == "subscription":
            async for response in self._subscribe_all(options, event_filter):
                yield response
            return
        for response in self._read_all(options, event_filter):
            yield response

    def _read_stream(self, options: streams_pb2.ReadReq.Options) -> list[streams_pb2.ReadResp]:
        name = options.stream.stream_identifier.stream_name.decode()
        records = self._log.stream(name)
        if records is None:
            return [streams_pb2.ReadResp(stream_not_found=streams_pb2.ReadResp.StreamNotFound())]
        backwards = options.read_direction == streams_pb2.ReadReq.Options.Backwards
        which = options.stream.WhichOneof("revision_option")
        if backwards:
            chosen = [
                r for r in reversed(records) if which != "revision" or r.revision <= options.stream.revision
            ]
        else:
            chosen = [r for r in records if which != "revision" or r.revision >= options.stream.revision]
        return [
            _read_event(self._log, r, resolve_links=options.resolve_links) for r in chosen[: options.count]
        ]

    def _read_all(
        self, options: streams_pb2.ReadReq.Options, event_filter: RegexFilter | None
    ) -> list[streams_pb2.ReadResp]:
        """Reading ``$all`` from a position includes the event at it (kurrentdbclient
        test_client.py ``test_stream_append_to_stream``: ``read_all(commit_position=p)``
        starts with the event at p)."""
        backwards = options.read_direction == streams_pb2.ReadReq.Options.Backwards
        which = options.all.WhichOneof("all_option")
        if which == "position":
            position = options.all.position.commit_position
            start = self._log.index_after(position, inclusive=not backwards)
        else:
            start = len(self._log.records) if which == "end" else 0
        out: list[streams_pb2.ReadResp] = []
        for record in self._log.scan(start, backwards=backwards):
            if len(out) >= options.count:
                break
            if event_filter is None or event_filter.matches(record):
                out.append(_read_event(self._log, record, resolve_links=options.resolve_links))
        return out

    async def _subscribe_all(
        self, options: streams_pb2.ReadReq.Options, event_filter: RegexFilter | None
    ) -> AsyncIterator[streams_pb2.ReadResp]:
        """Catch-up subscription: confirmation, the events *after* the given position,
        "caught up", then live events (kurrentdbclient test_client.py
        ``test_subscribe_to_all_from_commit_position_current``: "exclusive of given commit
        position")."""
        yield streams_pb2.ReadResp(
            confirmation=streams_pb2.ReadResp.SubscriptionConfirmation(subscription_id=str(uuid.uuid4()))
        )
        which = options.all.WhichOneof("all_option")
        if which == "position":
            index = self._log.index_after(options.all.position.commit_position, inclusive=False)
        else:
            index = len(self._log.records) if which == "end" else 0
        caught_up = False
        while True:
            records = self._log.records
            while index < len(records):
                record = records[index]
                index += 1
                if event_filter is None or event_filter.matches(record):
                    yield _read_event(self._log, record, resolve_links=options.resolve_links)
            if not caught_up:
                caught_up = True
                yield streams_pb2.ReadResp(caught_up=streams_pb2.ReadResp.CaughtUp())
            async with self._log.changed:
                if index >= len(self._log.records):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._log.changed.wait(), 1.0)


def _expectation_batch(options: streams_pb2.BatchAppendReq.Options) -> Expectation:
    which = options.WhichOneof("expected_stream_position")
    if which == "stream_position":
        return int(options.stream_position)
    return {"no_stream": Expect.NO_STREAM, "any": Expect.ANY, "stream_exists": Expect.EXISTS}[which]


class PersistentService(persistent_pb2_grpc.PersistentSubscriptionsServicer):
    def __init__(self, log: Log) -> None:
        self._log = log
        self._groups: dict[str, Group] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)

    async def _group(self, name: str, context: grpc.aio.ServicerContext) -> Group:
        group = self._groups.get(name)
        if group is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Subscription group '{name}' on stream '$all' does not exist."
            )
        assert group is not None
        return group

    async def Create(
        self, request: persistent_pb2.CreateReq, context: grpc.aio.ServicerContext
    ) -> persistent_pb2.CreateResp:
        options = request.options
        name = options.group_name
        if options.WhichOneof("stream_option") != "all":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stand-in only has groups on $all")
        if name in self._groups:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"Subscription group {name} on stream $all exists."
            )
        all_options = options.all
        which = all_options.WhichOneof("all_option")
        start = all_options.position.commit_position if which == "position" else None
        if which == "end":
            start = self._log.records[-1].position + 1
        s = options.settings
        settings = Settings(
            start=start,
            event_filter=_filter(all_options.filter)
            if all_options.WhichOneof("filter_option") == "filter"
            else None,
            strategy=s.consumer_strategy or s.named_consumer_strategy,
            message_timeout=s.message_timeout_ms / 1000,
            max_retry_count=s.max_retry_count,
            min_checkpoint_count=s.min_checkpoint_count,
            max_checkpoint_count=s.max_checkpoint_count,
            checkpoint_after=s.checkpoint_after_ms / 1000,
            max_subscriber_count=s.max_subscriber_count,
        )
        group = Group(name, settings, self._log)
        self._groups[name] = group
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run(group))
        return persistent_pb2.CreateResp()

    async def _run(self, group: Group) -> None:
        """The group's pump: on every change of the log or of the group, and every 50 ms
        for message timeouts and checkpoints."""
        while True:
            group.pump()
            group.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.wake.wait(), 0.05)

    async def Delete(
        self, request: persistent_pb2.DeleteReq, context: grpc.aio.ServicerContext
    ) -> persistent_pb2.DeleteResp:
        """Deleting a group drops its consumers and deletes its checkpoint and parked
        streams (KurrentDB docs: a re-created group starts afresh)."""
        group = await self._group(request.options.group_name, context)
        del self._groups[group.name]
        self._tasks.pop(group.name).cancel()
        group.close()
        for stream in (group.parked_stream, group.checkpoint_stream):
            with contextlib.suppress(StreamNotFound, WrongVersion):
                self._log.delete(stream, Expect.ANY)
        return persistent_pb2.DeleteResp()

    async def ReplayParked(
        self, request: persistent_pb2.ReplayParkedReq, context: grpc.aio.ServicerContext
    ) -> persistent_pb2.ReplayParkedResp:
        group = await self._group(request.options.group_name, context)
        group.replay_parked()
        return persistent_pb2.ReplayParkedResp()

    async def GetInfo(
        self, request: persistent_pb2.GetInfoReq, context: grpc.aio.ServicerContext
    ) -> persistent_pb2.GetInfoResp:
        group = await self._group(request.options.group_name, context)
        s = group.settings
        info = persistent_pb2.SubscriptionInfo(
            event_source="$all",
            group_name=group.name,
            status="Live",
            last_checkpointed_event_position=(
                "" if group.checkpoint is None else f"C:{group.checkpoint}/P:{group.checkpoint}"
            ),
            last_known_event_position=f"C:{self._log.records[-1].position}/P:{self._log.records[-1].position}",
            start_from=f"C:{s.start or 0}/P:{s.start or 0}",
            message_timeout_milliseconds=int(s.message_timeout * 1000),
            max_retry_count=s.max_retry_count,
            check_point_after_milliseconds=int(s.checkpoint_after * 1000),
            min_check_point_count=s.min_checkpoint_count,
            max_check_point_count=s.max_checkpoint_count,
            retry_buffer_count=group.in_retry(),
            total_in_flight_messages=len(group.outstanding),
            outstanding_messages_count=len(group.outstanding),
            named_consumer_strategy=s.strategy,
            max_subscriber_count=s.max_subscriber_count,
            parked_message_count=group.parked_count(),
            connections=[
                persistent_pb2.SubscriptionInfo.ConnectionInfo(
                    **{"from": f"127.0.0.1:{c.id}"},
                    username="admin",
                    total_items=c.total,
                    available_slots=c.free_slots,
                    in_flight_messages=len(c.in_flight),
                    connection_name=f"consumer-{c.id}",
                )
                for c in group.consumers.values()
            ],
        )
        return persistent_pb2.GetInfoResp(subscription_info=info)

    async def Read(
        self, request_iterator: AsyncIterator[persistent_pb2.ReadReq], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[persistent_pb2.ReadResp]:
        requests = request_iterator.__aiter__()
        first = await requests.__anext__()
        group = await self._group(first.options.group_name, context)
        if 0 < group.settings.max_subscriber_count <= len(group.consumers):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Maximum subscriptions reached.")
        consumer = Consumer(id=next(self._ids), buffer_size=max(1, first.options.buffer_size))
        group.add_consumer(consumer)
        settle = asyncio.get_running_loop().create_task(self._settle(group, requests))
        get: asyncio.Task[Message | None] | None = None
        try:
            yield persistent_pb2.ReadResp(
                subscription_confirmation=persistent_pb2.ReadResp.SubscriptionConfirmation(
                    subscription_id=group.subscription_id
                )
            )
            while True:
                get = asyncio.get_running_loop().create_task(consumer.outbox.get())
                done, _ = await asyncio.wait({get, settle}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    return  # the client closed its request stream
                message = get.result()
                if message is None:
                    await context.abort(grpc.StatusCode.CANCELLED, "Persistent subscription deleted")
                    return
                yield self._persistent_event(message)
        finally:
            settle.cancel()
            if get is not None:
                get.cancel()
            group.remove_consumer(consumer.id)

    @staticmethod
    def _persistent_event(message: Message) -> persistent_pb2.ReadResp:
        event_type = persistent_pb2.ReadResp.ReadEvent.RecordedEvent
        read_event = persistent_pb2.ReadResp.ReadEvent(
            event=_recorded(message.event, event_type),
            commit_position=(message.link or message.event).position,
            retry_count=message.retry_count,
        )
        if message.link is not None:
            read_event.link.CopyFrom(_recorded(message.link, event_type))
        return persistent_pb2.ReadResp(event=read_event)

    @staticmethod
    async def _settle(group: Group, requests: AsyncIterator[persistent_pb2.ReadReq]) -> None:
        async for request in requests:
            which = request.WhichOneof("content")
            if which == "ack":
                group.ack([uuid.UUID(i.string) for i in request.ack.ids])
            elif which == "nack":
                action = persistent_pb2.ReadReq.Nack.Action.Name(request.nack.action).lower()
                group.nack([uuid.UUID(i.string) for i in request.nack.ids], action, request.nack.reason)


class GossipService(gossip_pb2_grpc.GossipServicer):
    """A one-node cluster whose leader is this server (for ``+discover`` URIs)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port

    async def Read(
        self, request: shared_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.ClusterInfo:
        member = gossip_pb2.MemberInfo(
            instance_id=shared_pb2.UUID(string=str(uuid.uuid4())),
            state=gossip_pb2.MemberInfo.VNodeState.Leader,
            is_alive=True,
            http_end_point=gossip_pb2.EndPoint(address=self._host, port=self._port),
        )
        return gossip_pb2.ClusterInfo(members=[member])


async def serve(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the stand-in on ``host:port`` (0: a free port) and return it with its port."""
    log = Log()
    server = grpc.aio.server()
    bound = server.add_insecure_port(f"{host}:{port}")
    streams_pb2_grpc.add_StreamsServicer_to_server(StreamsService(log), server)
    persistent_pb2_grpc.add_PersistentSubscriptionsServicer_to_server(PersistentService(log), server)
    gossip_pb2_grpc.add_GossipServicer_to_server(GossipService(host, bound), server)
    await server.start()
    return server, bound
