"""Keyset pagination cursors: one codec for every read store.

A cursor is the sort values of the last row of a page (the id last: every sort ends
with it) plus the sort order it belongs to, as URL-safe base64 (no padding) of
msgpack. Both stores page the same way (SQLite with a keyset predicate,
Elasticsearch with ``search_after``), so a cursor means the same thing on both.

A cursor is client input: anything that does not decode, holds an integer outside
64 bits (neither store can compare it), or belongs to another sort order is
:class:`~orderstream.readstore.base.InvalidQuery` (a 400), never a 500.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated

import msgspec

from orderstream.readstore.base import InvalidQuery

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
CursorValue = Int64 | float | str | None


class _Cursor(msgspec.Struct, array_like=True, frozen=True):
    sort: str
    """The sort order's signature (each store spells its own, e.g. ``placed_at:d,id:d``)."""
    values: list[CursorValue]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Cursor)


def sort_signature(fields: Sequence[tuple[str, bool]]) -> str:
    """``[(field or expression, descending), ...]`` -> the signature a cursor carries."""
    return ",".join(f"{name}:{'d' if descending else 'a'}" for name, descending in fields)


def encode_cursor(sort: str, values: Sequence[CursorValue]) -> str:
    return base64.urlsafe_b64encode(_encoder.encode(_Cursor(sort, list(values)))).rstrip(b"=").decode()


def decode_cursor(cursor: str, sort: str, length: int) -> list[CursorValue]:
    """The values of a cursor made for ``sort`` (``length`` of them, the id last)."""
    try:
        decoded = _decoder.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidQuery("invalid cursor") from exc
    if decoded.sort != sort or len(decoded.values) != length:
        raise InvalidQuery("the cursor belongs to another sort order")
    return decoded.values
