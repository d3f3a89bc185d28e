"""Errors of the application layer that adapters raise and entry points map."""

from __future__ import annotations

import errno
import sqlite3


class ServiceUnavailable(Exception):
    """A service the request needs cannot answer now (down, unreachable, overloaded).

    Worth retrying later: the API answers 503 with ``Retry-After``."""

    def __init__(self, service: str, cause: BaseException | None = None) -> None:
        self.service = service
        self.cause = cause
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"{service} cannot be reached{reason}")


class StorageFull(ServiceUnavailable):
    """A store has no room left for a write (SQLite's ``SQLITE_FULL``, the file
    system's ``ENOSPC``).

    An outage, not a fault of the request or of an event: nothing was written,
    reads go on, and the same write succeeds once space is freed. The API answers
    507 with ``Retry-After``; a background consumer holds its events and backs off
    as for any outage (never parks them); nothing shuts down.
    """

    def __init__(self, service: str, cause: BaseException | None = None) -> None:
        super().__init__(service, cause)
        self.args = (f"{service} is full (no space left on its disk): {cause}",)


def is_storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: an SQLite error with the primary code
    ``SQLITE_FULL``, or an ``OSError`` with ``ENOSPC`` (or a disk quota exceeded)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
