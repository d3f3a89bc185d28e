"""Errors of the application layer that adapters raise and entry points map."""

from __future__ import annotations


class ServiceUnavailable(Exception):
    """A service the request needs cannot answer now (down, unreachable, overloaded).

    Worth retrying later: the API answers 503 with ``Retry-After``."""

    def __init__(self, service: str, cause: BaseException | None = None) -> None:
        self.service = service
        self.cause = cause
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"{service} cannot be reached{reason}")
