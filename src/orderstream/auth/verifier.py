"""Bearer token verification: signature, ``iss``, ``aud``, ``exp``/``nbf``, with PyJWT.

Keys come from one of two places:

- :class:`JwksKeys`: an OIDC issuer (Keycloak). The JWKS address is read once from
  ``{issuer}/.well-known/openid-configuration`` (or given: ``ORDERSTREAM_AUTH_JWKS_URL``);
  the keys are kept by ``kid``. The set is fetched again when a token names a ``kid``
  not seen yet (a key rotation), and in the background once it is older than
  :data:`MAX_KEY_AGE_SECONDS`, so a key the issuer no longer publishes (deleted after a
  leak) stops being trusted. One fetch at a time, at most one a second whether it
  succeeds or fails: requests waiting for a fetch share its outcome, and inside the
  second after a failed one an unknown ``kid`` is a 503 at once. While the issuer is
  down, the keys already held keep working.
- :class:`LocalKeys`: the local issuer's key (:mod:`orderstream.auth.local_issuer`).

A verified token is remembered (token -> principal) until it expires, so a client
that sends the same token again costs a dictionary look-up, not a signature check;
it is trusted only while its key is still published. A tampered token is another
string, so it is never found there.

Only access tokens are accepted: a token whose ``typ`` (Keycloak's claim, or the
header's, RFC 9068) says it is something else, such as an OIDC ID token, is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from jwt.algorithms import OKPAlgorithm

from orderstream.auth.local_issuer import ALGORITHM, LOCAL_ISSUER, ensure_signing_key
from orderstream.auth.principal import Principal, Role
from orderstream.config import Settings

LEEWAY_SECONDS = 30
"""Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
MIN_REFETCH_SECONDS = 1.0
"""The JWKS is fetched at most this often, whether the last fetch worked or not (a
flood of made-up kids costs the issuer one request a second, even while it is down)."""
MAX_KEY_AGE_SECONDS = 300.0
"""A key set older than this is fetched again in the background (the request that
notices it is not held up), so a key deleted at the issuer is dropped within minutes."""
FETCH_TIMEOUT_SECONDS = 5.0
"""Each HTTP request of a fetch (discovery, JWKS) gives up after this long."""
_ACCESS_TOKEN_TYPES = frozenset({"bearer", "at+jwt", "application/at+jwt"})
"""``typ`` values of an access token: Keycloak's claim ``Bearer``; RFC 9068's header."""
_HEADER_TYPES = _ACCESS_TOKEN_TYPES | {"jwt"}
log = logging.getLogger("orderstream.auth")
CACHE_SIZE = 10_000
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
"""Accepted algorithms: never ``none`` nor an HMAC one (a public key is not a secret)."""
_KNOWN_ROLES = {role.value: role for role in Role}


class InvalidToken(Exception):
    """The token cannot be trusted; the message says why (safe to show the caller)."""


class KeysUnavailable(Exception):
    """The issuer's keys cannot be fetched now (it is down): the token may be fine."""


class KeySource(Protocol):
    async def key_for(self, kid: str | None) -> jwt.PyJWK: ...


class LocalKeys:
    """The local issuer's one key (its public half)."""

    def __init__(self, data_dir: Path) -> None:
        private = ensure_signing_key(data_dir)
        public: dict[str, Any] = OKPAlgorithm.to_jwk(private.key.public_key(), as_dict=True)
        public.update(kid=private.key_id, alg=ALGORITHM, use="sig")
        self._key = jwt.PyJWK(public)

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        if kid != self._key.key_id:
            raise InvalidToken("the token was not signed by this server's key")
        return self._key


class JwksKeys:
    """An OIDC issuer's signing keys, fetched with PyJWT's ``PyJWKClient``."""

    def __init__(self, issuer: str, jwks_url: str | None = None) -> None:
        self._issuer = issuer.rstrip("/")
        self._jwks_url = jwks_url
        self._client: jwt.PyJWKClient | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        """When the set in ``_keys`` was fetched (monotonic); ``None``: never."""
        self._attempted_at = 0.0
        self._attempts = 0
        self._failure: KeysUnavailable | None = None
        """Why the last fetch failed; ``None`` after one that worked."""
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        if kid is None:
            raise InvalidToken("the token names no key (kid)")
        key = self._keys.get(kid)
        if key is not None:
            if self._aged():
                self._refresh_in_background()
            return key
        await self._refresh()
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._failure is not None:
            raise self._failure
        raise InvalidToken("the token was signed with a key the issuer does not publish")

    def _aged(self) -> bool:
        return self._loaded_at is not None and time.monotonic() - self._loaded_at > MAX_KEY_AGE_SECONDS

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._refresh(), name="jwks-refresh")

    async def _refresh(self) -> None:
        """Fetch the set again, unless a fetch ended while this caller waited for the
        lock (its outcome answers this caller too) or the last one failed less than
        :data:`MIN_REFETCH_SECONDS` ago (then the caller is answered from what is held)."""
        arrived_during = self._attempts
        async with self._lock:
            if self._attempts != arrived_during:
                return
            wait = self._attempted_at + MIN_REFETCH_SECONDS - time.monotonic()
            if wait > 0 and self._failure is not None:
                return
            await asyncio.sleep(max(0.0, wait))
            try:
                self._keys = await asyncio.to_thread(self._fetch)
                self._loaded_at = time.monotonic()
                if self._failure is not None:
                    log.info("identity provider: its keys are fetched again (%d held)", len(self._keys))
                self._failure = None
            except KeysUnavailable as failure:
                if self._failure is None:
                    why = failure.__cause__
                    log.warning("identity provider: %s: %s (the keys held are kept)", failure, why)
                self._failure = failure
            finally:
                self._attempted_at = time.monotonic()
                self._attempts += 1

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        try:
            if self._client is None:
                uri = self._jwks_url or _jwks_uri(self._issuer)
                self._client = jwt.PyJWKClient(uri, cache_jwk_set=False, timeout=FETCH_TIMEOUT_SECONDS)
            jwk_set = self._client.get_jwk_set(refresh=True)
        except jwt.PyJWKSetError as exc:
            raise KeysUnavailable("the issuer's key set holds no key this server can use") from exc
        except (jwt.PyJWTError, OSError, ValueError, KeyError, TypeError) as exc:
            # The caller is told the kind; the log (the cause) says the rest.
            raise KeysUnavailable(f"the issuer's keys cannot be fetched now ({type(exc).__name__})") from exc
        keys = {k.key_id: k for k in jwk_set.keys if k.key_id and k.public_key_use in (None, "sig")}
        if not keys:
            raise KeysUnavailable("the issuer's key set holds no key this server can use")
        return keys


def _jwks_uri(issuer: str) -> str:
    """The ``jwks_uri`` of the issuer's discovery document (KeyError, TypeError or
    ValueError if the document is not one)."""
    address = f"{issuer}/.well-known/openid-configuration"
    with urllib.request.urlopen(address, timeout=FETCH_TIMEOUT_SECONDS) as answer:
        document = json.load(answer)
    uri = document["jwks_uri"]
    if not isinstance(uri, str):
        raise TypeError("jwks_uri is not a string")
    return uri


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """``claim_at(c, "realm_access.roles")`` -> ``c["realm_access"]["roles"]`` (``None`` if absent)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


class TokenVerifier:
    """``await verify(token)`` -> the :class:`Principal`, or :class:`InvalidToken`."""

    def __init__(self, settings: Settings, keys: KeySource | None = None) -> None:
        self.issuer = settings.auth_issuer.rstrip("/") if settings.auth_issuer else LOCAL_ISSUER
        self.audience = settings.auth_audience
        self._roles_claim = settings.auth_roles_claim
        self._customer_claim = settings.auth_customer_claim
        if keys is None:
            issuer = settings.auth_issuer
            keys = JwksKeys(issuer, settings.auth_jwks_url) if issuer else LocalKeys(settings.data_dir)
        self._keys = keys
        self._verified: dict[str, _Verified] = {}

    async def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None and time.time() < known.expires + LEEWAY_SECONDS:
            try:
                await self._keys.key_for(known.kid)  # still published?
            except InvalidToken:
                self._verified.pop(token, None)
                raise
            return known.principal
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("the token is not a JWT") from None
        if not _of_type(header.get("typ"), _HEADER_TYPES):
            raise InvalidToken("the token is not an access token")
        kid = header.get("kid")
        key = await self._keys.key_for(kid)
        algorithm = key.algorithm_name
        if algorithm not in ASYMMETRIC or header.get("alg") != algorithm:
            raise InvalidToken("the token's algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(_reason(exc)) from None
        if not _of_type(claims.get("typ"), _ACCESS_TOKEN_TYPES):
            raise InvalidToken("the token is not an access token")
        principal = self._principal(claims)
        if len(self._verified) >= CACHE_SIZE:
            self._verified.clear()
        # Kept until its expiry, or an hour for an expiry no float can hold (an issuer's
        # bug, 10**400: it would otherwise be a 500 here).
        try:
            expires = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            expires = time.time() + 3600
        self._verified[token] = _Verified(principal, expires, kid)
        return principal

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        raw_roles = claim_at(claims, self._roles_claim)
        listed = raw_roles if isinstance(raw_roles, list) else ()
        # Only strings can be roles: a list or object in the list (a mapper's mistake) is skipped.
        roles = frozenset(_KNOWN_ROLES[r] for r in listed if isinstance(r, str) and r in _KNOWN_ROLES)
        customer = claim_at(claims, self._customer_claim)
        subject = str(claims["sub"])
        if not subject.strip():
            # An identity no one else can have: an empty one would be every customer's
            # filter left out (a mapper's mistake, but it must fail closed).
            raise InvalidToken("the token's subject is empty")
        return Principal(
            subject=subject,
            roles=roles,
            customer_id=customer if isinstance(customer, str) and customer.strip() else subject,
        )


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    expires: float
    kid: str | None


def _of_type(typ: Any, accepted: frozenset[str]) -> bool:
    """No ``typ`` at all is fine (many issuers leave it out); a present one must be accepted."""
    return typ is None or (isinstance(typ, str) and typ.lower() in accepted)


def _reason(exc: jwt.InvalidTokenError) -> str:
    match exc:
        case jwt.ExpiredSignatureError():
            return "the token has expired"
        case jwt.ImmatureSignatureError():
            return "the token is not valid yet"
        case jwt.InvalidAudienceError():
            return "the token is meant for another audience"
        case jwt.InvalidIssuerError():
            return "the token comes from another issuer"
        case jwt.InvalidSignatureError():
            return "the token's signature does not match"
        case jwt.MissingRequiredClaimError():
            return f"the token lacks the {exc.claim!r} claim"
        case _:
            return "the token is malformed"
