"""The request's correlation id: the client's ``X-Correlation-ID`` if it is sane,
else a new UUID. Computed once per request, kept in the ASGI scope state, echoed
on every answer (errors and unknown routes too) and written into the metadata
of every event the request appends."""

from __future__ import annotations

import re
import uuid
from typing import Any

from litestar.types import Scope

HEADER = "X-Correlation-ID"
_OK = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def correlation_id(scope: Scope) -> str:
    state: dict[str, Any] = scope.setdefault("state", {})
    existing = state.get("correlation_id")
    if isinstance(existing, str):
        return existing
    given = None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-correlation-id":
            given = value.decode("latin-1").strip()
            break
    cid = given if given and _OK.match(given) else str(uuid.uuid4())
    state["correlation_id"] = cid
    return cid
