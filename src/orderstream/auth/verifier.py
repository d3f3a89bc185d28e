"""Bearer token verification: signature, ``iss``, ``aud``, ``exp``/``nbf``, with PyJWT.

Keys come from one of two places:

- :class:`JwksKeys`: an OIDC issuer (Keycloak). The JWKS address is read once from
  ``{issuer}/.well-known/openid-configuration`` (or given: ``ORDERSTREAM_AUTH_JWKS_URL``);
  the keys are kept by ``kid`` and the set is fetched again only when a token names
  a ``kid`` not seen yet (a key rotation), at most once a second. No network on the
  request path otherwise.
- :class:`LocalKeys`: the local issuer's key (:mod:`orderstream.auth.local_issuer`).

A verified token is remembered (token -> principal) until it expires, so a client
that sends the same token again costs a dictionary look-up, not a signature check.
A tampered token is another string, so it is never found there.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Mapping
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
"""An unknown ``kid`` refetches the JWKS at most this often (a flood of made-up kids
costs the issuer one request a second)."""
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
        self._fetched_at = 0.0
        self._fetches = 0
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        if kid is None:
            raise InvalidToken("the token names no key (kid)")
        key = self._keys.get(kid)
        if key is not None:
            return key
        arrived_after = self._fetches
        async with self._lock:
            # A fetch that finished while this request waited for the lock answers it too:
            # a burst of tokens with one new (or made-up) kid costs one fetch.
            if kid not in self._keys and self._fetches == arrived_after:
                await asyncio.sleep(max(0.0, self._fetched_at + MIN_REFETCH_SECONDS - time.monotonic()))
                self._keys = await asyncio.to_thread(self._fetch)
                self._fetched_at = time.monotonic()
                self._fetches += 1
        key = self._keys.get(kid)
        if key is None:
            raise InvalidToken("the token was signed with a key the issuer does not publish")
        return key

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        try:
            if self._client is None:
                uri = self._jwks_url or _jwks_uri(self._issuer)
                self._client = jwt.PyJWKClient(uri, cache_jwk_set=False, timeout=5)
            jwk_set = self._client.get_jwk_set(refresh=True)
        except (jwt.PyJWKClientError, OSError, ValueError) as exc:
            raise KeysUnavailable(f"the issuer's keys cannot be fetched now ({type(exc).__name__})") from None
        return {k.key_id: k for k in jwk_set.keys if k.key_id and k.public_key_use in (None, "sig")}


def _jwks_uri(issuer: str) -> str:
    with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", timeout=5) as answer:
        return str(json.load(answer)["jwks_uri"])


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
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None and time.time() < known[1] + LEEWAY_SECONDS:
            return known[0]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("the token is not a JWT") from None
        key = await self._keys.key_for(header.get("kid"))
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
        principal = self._principal(claims)
        if len(self._verified) >= CACHE_SIZE:
            self._verified.clear()
        # Kept until its expiry, or an hour for an expiry no float can hold (an issuer's
        # bug, 10**400: it would otherwise be a 500 here).
        try:
            expires = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            expires = time.time() + 3600
        self._verified[token] = (principal, expires)
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
