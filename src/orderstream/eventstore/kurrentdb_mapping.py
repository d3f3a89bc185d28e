"""Pure translation between the event-store port and KurrentDB (no I/O).

Everything here is testable without a server (``tests/contract/test_kurrentdb_specific.py``);
:mod:`orderstream.eventstore.kurrentdb` does the talking. The decisions are written up
in ``docs/kurrentdb.md``.
"""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec
from kurrentdbclient import StreamState as KdbStreamState
from kurrentdbclient.connection_spec import URI_SCHEMES_ALL, ConnectionSpec
from kurrentdbclient.persistent import ConsumerStrategy

from orderstream.eventstore.base import (
    EventFilter,
    Expected,
    NackAction,
    StreamState,
    SubscriptionSettings,
)

# ----------------------------------------------------------------------------- URI


def validate_uri(uri: str) -> ConnectionSpec:
    """Check a connection string the way the client will read it, with clearer errors.

    Accepted: ``kurrentdb://host:2113?tls=false``, ``kurrentdb+discover://...``,
    ``esdb://...``, ``esdb+discover://...`` (and the client's ``kdb`` spellings).
    Raises :class:`ValueError`.
    """
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme not in URI_SCHEMES_ALL:
        raise ValueError(
            f"not a KurrentDB connection string: {uri!r} "
            f"(expected one of {', '.join(s + '://' for s in URI_SCHEMES_ALL)}, "
            "e.g. 'kurrentdb://localhost:2113?tls=false')"
        )
    try:
        return ConnectionSpec(uri)
    except ValueError as exc:
        hint = ""
        if "Username and password are required" in str(exc):
            hint = (
                " TLS is on by default and then needs credentials "
                "('kurrentdb://admin:changeit@host:2113'); an insecure dev server needs '?tls=false'."
            )
        raise ValueError(f"invalid KurrentDB connection string {uri!r}: {exc}.{hint}") from exc


# ----------------------------------------------------------------------- expectations


def to_client_expected(expected: Expected) -> int | KdbStreamState:
    """Port expectation -> the client's ``current_version`` argument."""
    if isinstance(expected, StreamState):
        return {
            StreamState.NO_STREAM: KdbStreamState.NO_STREAM,
            StreamState.STREAM_EXISTS: KdbStreamState.EXISTS,
            StreamState.ANY: KdbStreamState.ANY,
        }[expected]
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise ValueError(f"expected revision must be an int >= 0 or a StreamState, not {expected!r}")
    return expected


class Unknown:
    pass


UNKNOWN = Unknown()
"""The client's exception did not say what the stream's revision is."""


def actual_from_client(actual: object) -> int | Unknown | None:
    """``WrongCurrentVersionError.actual_version`` -> the port's ``actual`` revision.

    The client sets it to an ``int`` (the current revision) or ``StreamState.NO_STREAM``
    (the stream does not exist). Anything else means "not known": the caller reads the
    stream's last revision instead.
    """
    if isinstance(actual, int) and not isinstance(actual, bool):
        return actual if actual >= 0 else UNKNOWN
    if actual is KdbStreamState.NO_STREAM:
        return None
    return UNKNOWN


def expectation_met(expected: Expected, revision: int | None) -> bool:
    """Whether a stream at ``revision`` (``None``: missing) satisfies ``expected``."""
    if expected is StreamState.ANY:
        return True
    if expected is StreamState.NO_STREAM:
        return revision is None
    if expected is StreamState.STREAM_EXISTS:
        return revision is not None
    return revision == expected


def revision_after_append(expected: Expected, count: int) -> int | None:
    """The stream revision after appending ``count`` events, when it follows from the
    expectation alone (``None`` for ``ANY`` / ``STREAM_EXISTS``: the caller looks it up)."""
    if isinstance(expected, StreamState):
        return count - 1 if expected is StreamState.NO_STREAM else None
    return expected + count


# ------------------------------------------------------------------------------ filters

SYSTEM_STREAM_PATTERN = r"\$.*"
"""Stream names starting with ``$`` are KurrentDB's own ($persistentsubscription-...,
$$metadata, $ce-/$et- projections, $scavenges, ...). Never shown to orderstream."""

_REGEX_META = re.compile(r"([\\.^$|?*+()\[\]{}])")


def regex_escape(text: str) -> str:
    """Escape regex metacharacters in a way both .NET (the server) and Python accept."""
    return _REGEX_META.sub(r"\\\1", text)


def category_pattern(categories: tuple[str, ...]) -> str:
    """Stream-name pattern for categories. The client wraps include patterns as
    ``^(...)$``, so ``('order', 'product')`` matches ``^(?:order|product)-.*$``."""
    return "(?:" + "|".join(regex_escape(c) for c in categories) + ")-.*"


def type_pattern(types: tuple[str, ...]) -> str:
    """Event-type pattern: ``^(?:OrderPlaced|OrderCancelled)$`` once wrapped by the client."""
    return "(?:" + "|".join(regex_escape(t) for t in types) + ")"


class ServerFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What to send to the server (``filter_include`` / ``filter_exclude`` /
    ``filter_by_stream_name`` of ``read_all``, ``subscribe_to_all`` and
    ``create_subscription_to_all``) and what is left to check here.

    A server-side filter is on the stream name *or* on the event type, never both.
    With categories and types set, the server filters by category (stream name) and
    the types are checked client-side (``client_types``).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    by_stream_name: bool = True
    client_types: tuple[str, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return {
            "filter_include": self.include,
            "filter_exclude": self.exclude,
            "filter_by_stream_name": self.by_stream_name,
        }


def server_filter(event_filter: EventFilter | None) -> ServerFilter:
    if event_filter is not None and event_filter.categories:
        return ServerFilter(
            include=(category_pattern(event_filter.categories),),
            by_stream_name=True,
            client_types=event_filter.types,
        )
    if event_filter is not None and event_filter.types:
        return ServerFilter(include=(type_pattern(event_filter.types),), by_stream_name=False)
    return ServerFilter(exclude=(SYSTEM_STREAM_PATTERN,), by_stream_name=True)


def is_system(stream: str, event_type: str) -> bool:
    return stream.startswith("$") or event_type.startswith("$")


def wanted(event_filter: EventFilter | None, stream: str, event_type: str) -> bool:
    """The client-side check applied to every event the server sends (a safety net for
    the half of the filter the server did not apply, and for system events)."""
    if is_system(stream, event_type):
        return False
    return event_filter is None or event_filter.matches(stream, event_type)


def full_match(pattern: str, text: str) -> bool:
    """How the client applies an include pattern (``^pattern$``), for tests."""
    return re.fullmatch(f"^{pattern}$", text) is not None


# ----------------------------------------------------------------------------- metadata

SCHEMA_VERSION_KEY = "$schema_version"
RAW_METADATA_KEY = "$metadata"
RAW_METADATA_B64_KEY = "$metadata_b64"
_PREFIX = b'{"' + SCHEMA_VERSION_KEY.encode() + b'":'
_STORED = re.compile(rb'^\{"\$schema_version":(\d+)([,}])')
_RAW_KEYS = (
    b'"' + RAW_METADATA_KEY.encode() + b'":',
    b'"' + RAW_METADATA_B64_KEY.encode() + b'":',
)


def encode_metadata(metadata: bytes, schema_version: int) -> bytes:
    """Put the schema version into the event's metadata JSON under ``$schema_version``.

    KurrentDB has no field for it (content type is only json/octet-stream), so it goes
    first in the metadata object, e.g. ``{"$schema_version":2,"correlation_id":"..."}``;
    the rest of the caller's bytes are kept verbatim so :func:`decode_metadata` gives
    back exactly the bytes that were appended. Metadata that is not a non-empty JSON
    object (or uses one of the reserved keys) is kept as a string under ``$metadata``
    (``$metadata_b64`` if it is not UTF-8); ``b"{}"`` is stored as just the version.
    """
    if isinstance(schema_version, bool) or schema_version < 0:
        raise ValueError(f"schema_version must be an int >= 0, not {schema_version!r}")
    prefix = _PREFIX + str(schema_version).encode()
    if metadata == b"{}":
        return prefix + b"}"
    if metadata.startswith(b"{"):
        try:
            decoded = msgspec.json.decode(metadata)
        except msgspec.DecodeError:
            decoded = None
        if (
            isinstance(decoded, dict)
            and decoded
            and not {SCHEMA_VERSION_KEY, RAW_METADATA_KEY, RAW_METADATA_B64_KEY} & decoded.keys()
        ):
            return prefix + b"," + metadata[1:]
    try:
        raw: dict[str, Any] = {RAW_METADATA_KEY: metadata.decode("utf-8")}
    except UnicodeDecodeError:
        raw = {RAW_METADATA_B64_KEY: base64.b64encode(metadata).decode("ascii")}
    return prefix + b"," + msgspec.json.encode(raw)[1:]


def decode_metadata(stored: bytes) -> tuple[int, bytes]:
    """Inverse of :func:`encode_metadata`: ``(schema_version, metadata bytes)``.

    Events written by other tools (no ``$schema_version`` first) are schema version 1
    and their metadata is returned unchanged.
    """
    match = _STORED.match(stored)
    if match is None:
        return 1, stored
    version = int(match.group(1))
    if match.group(2) == b"}":
        return (version, b"{}") if match.end() == len(stored) else (1, stored)
    rest = stored[match.end() :]
    if rest.startswith(_RAW_KEYS):
        try:
            decoded = msgspec.json.decode(stored)
        except msgspec.DecodeError:
            return 1, stored
        if isinstance(decoded.get(RAW_METADATA_KEY), str):
            return version, decoded[RAW_METADATA_KEY].encode("utf-8")
        if isinstance(decoded.get(RAW_METADATA_B64_KEY), str):
            return version, base64.b64decode(decoded[RAW_METADATA_B64_KEY])
        return 1, stored
    return version, b"{" + rest


# ------------------------------------------------------------- persistent subscriptions

CONSUMER_STRATEGY: Final[ConsumerStrategy] = "Pinned"
"""Pins each *source stream* (hash of the event's stream id, 1024 buckets) to one
consumer of the group, so the events of one aggregate reach one projector at a time
and in order. ``PinnedByCorrelation`` hashes ``$correlationId`` (events of one
aggregate can then go to different consumers); ``RoundRobin``/``DispatchToSingle``
do not keep per-stream order across consumers at all."""


def server_max_retry_count(max_retry: int) -> int:
    """Port ``max_retry`` (deliveries before parking) -> server ``max_retry_count``.

    The server parks a nacked/timed-out message when its retry count (0 on the first
    delivery, +1 per retry) has reached ``MaxRetryCount``; so ``max_retry`` deliveries
    means ``MaxRetryCount = max_retry - 1``.
    """
    return max(max_retry - 1, 0)


ClientNackAction = Literal["retry", "park", "skip"]


def client_nack_action(action: NackAction) -> ClientNackAction:
    """Port nack action -> the client's ``nack(action=...)``."""
    mapping: dict[NackAction, ClientNackAction] = {
        NackAction.RETRY: "retry",
        NackAction.PARK: "park",
        NackAction.SKIP: "skip",
    }
    return mapping[action]


def parse_all_position(text: str | None) -> int | None:
    """A ``$all`` position as the server reports it in subscription info
    (``"C:1234/P:1234"``; start ``"C:0/P:0"``; end ``"C:-1/P:-1"``; none ``""``)
    -> the commit position, or ``None`` when there is none."""
    if not text:
        return None
    head = text.split("/", 1)[0].strip()
    if ":" in head:
        head = head.split(":", 1)[1]
    try:
        value = int(head)
    except ValueError:
        return None
    return value if value >= 0 else None


def parked_stream(group: str) -> str:
    """Where the server links parked events of a group on ``$all``:
    ``"$persistentsubscription-" + subscriptionId + "-parked"``, subscriptionId being
    ``"$all::" + group`` (KurrentDB PersistentSubscriptionMessageParker)."""
    return f"$persistentsubscription-$all::{group}-parked"


def settings_stream(group: str) -> str:
    """orderstream's copy of a group's :class:`SubscriptionSettings` (the server keeps
    no filter it can report back, and the half of a two-part filter that it does not
    apply has to be applied by the consumer)."""
    return f"$orderstream-subscription-settings-{group}"


def notes_stream(group: str, incarnation: uuid.UUID | None) -> str:
    """Why and after how many deliveries orderstream parked an event: the client's
    ``nack`` sends no reason, so the server records only a generic one. One stream per
    incarnation of the group, so a group deleted and created again starts with none
    (a soft-deleted stream's notes would come back if its metadata were rewritten)."""
    suffix = f"-{incarnation.hex}" if incarnation is not None else ""
    return f"$orderstream-parked-notes-{group}{suffix}"


class GroupRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What orderstream keeps about a group in :func:`settings_stream`."""

    settings: SubscriptionSettings
    incarnation: uuid.UUID


class ParkNote(msgspec.Struct, frozen=True, kw_only=True):
    event_id: uuid.UUID
    reason: str
    attempts: int


class ParkedLinkInfo(msgspec.Struct, frozen=True, kw_only=True):
    reason: str
    added: datetime | None
    attempts: int | None
    """Deliveries, when the server's reason says it (``Reached retry count of N``)."""


_RETRY_REASON = re.compile(r"Reached retry count of (\d+)")


def parse_parked_link_metadata(metadata: bytes) -> ParkedLinkInfo:
    """Metadata of a link in the parked stream, written by the server as
    ``{"Added": ..., "Reason": ..., "SubscriptionEventNumber": ...}`` (key case may vary)."""
    try:
        decoded = msgspec.json.decode(metadata) if metadata else {}
    except msgspec.DecodeError:
        decoded = {}
    fields = {str(k).lower(): v for k, v in decoded.items()} if isinstance(decoded, dict) else {}
    reason = str(fields.get("reason") or "")
    added: datetime | None = None
    if isinstance(fields.get("added"), str):
        try:
            added = datetime.fromisoformat(fields["added"])
        except ValueError:
            added = None
        if added is not None and added.tzinfo is None:
            added = added.replace(tzinfo=UTC)  # the server's local time; UTC in its containers
    match = _RETRY_REASON.search(reason)
    attempts = int(match.group(1)) + 1 if match else None
    return ParkedLinkInfo(reason=reason, added=added, attempts=attempts)


__all__ = [
    "CONSUMER_STRATEGY",
    "SYSTEM_STREAM_PATTERN",
    "UNKNOWN",
    "GroupRecord",
    "ParkNote",
    "ParkedLinkInfo",
    "ServerFilter",
    "Unknown",
    "actual_from_client",
    "category_pattern",
    "client_nack_action",
    "decode_metadata",
    "encode_metadata",
    "expectation_met",
    "full_match",
    "is_system",
    "notes_stream",
    "parked_stream",
    "parse_all_position",
    "parse_parked_link_metadata",
    "regex_escape",
    "revision_after_append",
    "server_filter",
    "server_max_retry_count",
    "settings_stream",
    "to_client_expected",
    "type_pattern",
    "validate_uri",
    "wanted",
]
