"""The ``Authorization`` header the benchmarks send to the services they start.

Each ``orderstream`` the benchmarks start runs with the local issuer (its key in
the service's data dir); :func:`register` mints an admin token for it (admins are
exempt from the per-identity write limit, so the load is not throttled) and
:func:`headers` / :func:`authorization` hand it to httpx clients and to wrk
(``WRK_AUTHORIZATION``, read by ``bench/wrk/common.lua``). A URL that was not
registered (the bare app) gets no header.
"""

from __future__ import annotations

from pathlib import Path

from orderstream.auth.local_issuer import issue_token
from orderstream.config import Settings

TTL = 24 * 3600
_by_url: dict[str, str] = {}


def register(url: str, data_dir: Path) -> None:
    """``url`` is an orderstream serving the data dir ``data_dir``."""
    _by_url[url.rstrip("/")] = f"Bearer {issue_token(Settings(data_dir=data_dir), ['admin'], ttl=TTL)}"


def authorization(url: str) -> str | None:
    for base, value in _by_url.items():
        if url.startswith(base):
            return value
    return None


def headers(url: str) -> dict[str, str]:
    value = authorization(url)
    return {"Authorization": value} if value else {}
