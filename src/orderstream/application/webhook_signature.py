"""Signatures of the payment provider's webhook calls.

Anyone can reach ``POST /payments/{payment_id}/webhook``, and a call there can
let an unpaid order ship, so the provider signs each call with a secret it
shares with us, the scheme Stripe and others use::

    Orderstream-Signature: t=1767225600,v1=5257a869...

``v1`` is the hex HMAC-SHA256, keyed with the shared secret, of
``"<t>.<raw body>"``: the body exactly as sent (verified before it is decoded:
re-encoding could change the bytes), bound to the time of sending so that a
captured call stops working after :data:`TOLERANCE_SECONDS`. While a secret is
being rotated the provider signs with the old and the new one, so a header may
carry several ``v1=``, and we accept any secret we know (``ORDERSTREAM_WEBHOOK_SECRET``
is a comma-separated list for that reason). A replay inside the tolerance is
the route's business: each delivery carries the provider's ``event_id``, which
is recorded with its effect (see ``sagas/fulfilment/routes.py``).

With no ``ORDERSTREAM_WEBHOOK_SECRET`` a secret is generated into the data dir
(:data:`SECRET_FILE`, mode 0600) the first time it is needed, by the server or
by ``orderstream webhook sign``, whichever comes first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

HEADER = "Orderstream-Signature"
TOLERANCE_SECONDS = 300
"""How far the signature's ``t`` may be from our clock, either way."""
SECRET_FILE = "webhook-secret"
"""The generated secret's file name in the data dir."""
MAX_HEADER_LENGTH = 2048
MAX_SIGNATURES = 8


class InvalidSignature(Exception):
    """The call is not from the provider (or not any more): answered 401. The
    message says what is wrong, never what was expected."""


def compute(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    return hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secrets_: Sequence[str], timestamp: int) -> str:
    """The header value, with one ``v1=`` per secret (several while rotating)."""
    return ",".join([f"t={timestamp}", *(f"v1={compute(s, timestamp, body)}" for s in secrets_)])


def parse(header: str) -> tuple[int, list[str]]:
    """``"t=1,v1=ab,v1=cd"`` -> ``(1, ["ab", "cd"])``; other schemes' parts are skipped."""
    if len(header) > MAX_HEADER_LENGTH:
        raise InvalidSignature(f"the {HEADER} header is too long")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise InvalidSignature(f"the {HEADER} header is malformed (expected t=...,v1=...)")
        if key == "t":
            if timestamp is not None or not value.isdigit() or not value.isascii() or len(value) > 12:
                raise InvalidSignature(f"the {HEADER} header needs one t=<unix seconds>")
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise InvalidSignature(f"the {HEADER} header needs t=<unix seconds> and at least one v1=<hex>")
    if len(signatures) > MAX_SIGNATURES:
        raise InvalidSignature(f"the {HEADER} header carries too many signatures")
    return timestamp, signatures


def verify(header: str | None, body: bytes, secrets_: Sequence[str], *, now: float) -> None:
    """Raise :class:`InvalidSignature` unless one ``v1`` of ``header`` is the
    signature of ``body`` under one of ``secrets_``, made within the tolerance.

    Every candidate is compared in constant time (``hmac.compare_digest``), and
    all of them are compared, so the time taken does not tell which one was close."""
    if not header:
        raise InvalidSignature(f"the {HEADER} header is missing")
    timestamp, signatures = parse(header)
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise InvalidSignature(f"the signature's timestamp is more than {TOLERANCE_SECONDS} s from now")
    expected = [compute(secret, timestamp, body).encode() for secret in secrets_]
    matched = False
    for given in signatures:
        for wanted in expected:
            matched |= hmac.compare_digest(given.encode(), wanted)
    if not matched:
        raise InvalidSignature("the signature does not match the body")


# ---------------------------------------------------------------------------- secrets


def load_or_create_secret(data_dir: Path) -> str:
    """The secret in ``data_dir/webhook-secret``, generated (mode 0600) if absent.

    Safe when several processes start at once (API workers, the CLI): the secret
    is written to a private temporary file and linked into place, and whoever
    links first wins; the others read the winner's."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: use its secret
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    secret = path.read_text().strip()
    if not secret:
        raise OSError(f"{path} is empty: delete it to have a new secret generated")
    return secret


def webhook_secrets(configured: Sequence[str], data_dir: Path) -> tuple[str, ...]:
    """``ORDERSTREAM_WEBHOOK_SECRET``'s secrets when set, else the data dir's."""
    return tuple(configured) or (load_or_create_secret(data_dir),)


def describe_secret(configured: Sequence[str], data_dir: Path) -> str:
    """Where the secret comes from, for the server's start-up lines (never the
    secret itself). Generates the data dir's secret if it is the one in use, so
    that it exists from the first start and can be handed to the provider."""
    if configured:
        return f"payment webhooks: signed with ORDERSTREAM_WEBHOOK_SECRET ({len(configured)} secret(s))"
    load_or_create_secret(data_dir)
    return (
        f"payment webhooks: signed with the secret in {data_dir / SECRET_FILE} "
        "(`orderstream webhook sign --body FILE` prints a signature)"
    )
