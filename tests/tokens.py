"""Bearer tokens for the tests: one place that mints them.

In-process apps and the servers the tests start (``orderstream serve``/``api``)
run with the local issuer, whose key lives in the data dir; :func:`token_for`
signs a token with that key (creating it first if the server has not yet), so a
test gets a token for a server before or after starting it.
"""

from __future__ import annotations

from pathlib import Path

from orderstream.auth.local_issuer import issue_token
from orderstream.config import Settings


def token_for(
    where: Settings | Path,
    *roles: str,
    customer_id: str | None = None,
    subject: str | None = None,
    ttl: int = 3600,
) -> str:
    """A token of the local issuer of ``where`` (settings, or a server's data dir);
    ``admin`` when no role is given."""
    settings = where if isinstance(where, Settings) else Settings(data_dir=where)
    return issue_token(settings, roles or ("admin",), customer_id=customer_id, subject=subject, ttl=ttl)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_headers(where: Settings | Path) -> dict[str, str]:
    """``Authorization`` for an admin of the server whose settings or data dir is ``where``."""
    return bearer(token_for(where))
