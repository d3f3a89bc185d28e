"""The local issuer: a signing key kept in the data dir, for running without an
identity provider (``ORDERSTREAM_AUTH_ISSUER`` unset).

The key is an Ed25519 private JWK in ``{data_dir}/auth/signing-key.jwk``, file mode
0600, created on first start. Creation is atomic (written aside, then hard-linked
into place, which fails if another process got there first), so API workers and
``orderstream tokens issue`` starting at once all end up with the same key.

Tokens it issues have the shape of Keycloak's (roles under the configured roles
claim, ``realm_access.roles`` by default), so the API verifies both the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from orderstream.auth.principal import Role
from orderstream.config import Settings

LOCAL_ISSUER = "urn:orderstream:local-issuer"
"""The ``iss`` of locally issued tokens."""
ALGORITHM = "EdDSA"
DEFAULT_TTL = 3600
MAX_TTL = 30 * 24 * 3600


def key_path(data_dir: Path) -> Path:
    return data_dir / "auth" / "signing-key.jwk"


def ensure_signing_key(data_dir: Path) -> jwt.PyJWK:
    """The local signing key, created (mode 0600) if there is none yet."""
    path = key_path(data_dir)
    if not path.exists():
        _create_key(path)
    return jwt.PyJWK(json.loads(path.read_text()), algorithm=ALGORITHM)


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    jwk: dict[str, Any] = OKPAlgorithm.to_jwk(Ed25519PrivateKey.generate(), as_dict=True)
    jwk.update(kid=uuid.uuid4().hex[:16], alg=ALGORITHM, use="sig")
    aside = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(jwk, out)
        with contextlib.suppress(FileExistsError):  # another process created it first
            os.link(aside, path)  # atomic
    finally:
        aside.unlink(missing_ok=True)


def _nested(path: str, value: Any) -> dict[str, Any]:
    """``("realm_access.roles", v)`` -> ``{"realm_access": {"roles": v}}``."""
    claims: dict[str, Any] = {}
    cursor = claims
    *parents, last = path.split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[last] = value
    return claims


def issue_token(
    settings: Settings,
    roles: Sequence[str],
    *,
    customer_id: str | None = None,
    subject: str | None = None,
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
) -> str:
    """A token signed with the local key of ``settings.data_dir``.

    ``subject`` defaults to the customer id, else ``local-<first role>``."""
    unknown = sorted(set(roles) - {r.value for r in Role})
    if not roles or unknown:
        raise ValueError(f"roles must be among {sorted(r.value for r in Role)}, got {list(roles)}")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be 1 to {MAX_TTL} seconds")
    key = ensure_signing_key(settings.data_dir)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": LOCAL_ISSUER,
        "aud": settings.auth_audience,
        "sub": subject or customer_id or f"local-{roles[0]}",
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
        **_nested(settings.auth_roles_claim, sorted(set(roles))),
    }
    if customer_id is not None:
        claims.update(_nested(settings.auth_customer_claim, customer_id))
    return jwt.encode(claims, key.key, algorithm=ALGORITHM, headers={"kid": key.key_id})


def how_to_get_a_token(settings: Settings) -> str:
    """What ``serve``/``api`` print on start: where tokens come from."""
    if not settings.auth_enabled:
        return "AUTH IS OFF (--no-auth / ORDERSTREAM_AUTH=off): every caller may do everything."
    if settings.auth_issuer:
        return (
            f"auth: bearer tokens from {settings.auth_issuer} (audience {settings.auth_audience!r}); "
            "/health, /ready and /schema need none"
        )
    return (
        "auth: get a token with: orderstream tokens issue "
        f"--data-dir {settings.data_dir} --role admin  (roles: {', '.join(r.value for r in Role)})"
    )
