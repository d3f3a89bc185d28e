"""``TokenVerifier`` against a real HTTP JWKS endpoint (a tiny server in a thread):
keys are fetched once, kept, fetched again on an unknown ``kid`` (a rotation), and a
burst of made-up kids costs the issuer one request, not one per token."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from orderstream.auth.principal import Role
from orderstream.auth.verifier import InvalidToken, TokenVerifier
from orderstream.config import Settings


class Issuer:
    """An OIDC issuer's discovery document and JWKS, served over HTTP, with a count of
    the JWKS requests."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.jwks_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/certs"}
                elif self.path.endswith("/certs"):
                    issuer.jwks_requests += 1
                    body = {"keys": [issuer.public_jwk(kid) for kid in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/realms/test"

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public_jwk(self, kid: str) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
        return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}

    def token(self, kid: str, *, sub: str = "ada", roles: tuple[str, ...] = ("admin",), **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.url,
            "aud": "orderstream",
            "sub": sub,
            "exp": now + 300,
            "realm_access": {"roles": list(roles)},
            **claims,
        }
        return jwt.encode(payload, self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    served = Issuer()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()


def verifier_for(issuer: Issuer, tmp_path: Path) -> TokenVerifier:
    return TokenVerifier(Settings(data_dir=tmp_path, auth_issuer=issuer.url))


async def test_keys_are_fetched_once_and_again_only_for_a_new_kid(issuer: Issuer, tmp_path: Path) -> None:
    issuer.add_key("k1")
    verifier = verifier_for(issuer, tmp_path)
    principal = await verifier.verify(issuer.token("k1", sub="alice", roles=("customer",), customer_id="c-a"))
    assert principal.subject == "alice"
    assert principal.roles == {Role.CUSTOMER}
    assert principal.customer_id == "c-a"
    for i in range(5):  # other tokens, same key: no request
        await verifier.verify(issuer.token("k1", sub=f"user-{i}"))
    assert issuer.jwks_requests == 1

    issuer.add_key("k2")  # a rotation at the issuer
    await asyncio.sleep(1.0)  # the refetch floor
    assert (await verifier.verify(issuer.token("k2"))).roles == {Role.ADMIN}
    assert issuer.jwks_requests == 2
    await verifier.verify(issuer.token("k1", sub="late"))  # the old key still works while published
    assert issuer.jwks_requests == 2


async def test_a_burst_of_unknown_kids_costs_one_fetch(issuer: Issuer, tmp_path: Path) -> None:
    issuer.add_key("k1")
    verifier = verifier_for(issuer, tmp_path)
    await verifier.verify(issuer.token("k1"))
    forged = jwt.encode(
        {"iss": issuer.url, "aud": "orderstream", "sub": "x", "exp": int(time.time()) + 60},
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers={"kid": "made-up"},
    )
    outcomes = await asyncio.gather(*(verifier.verify(forged) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(o, InvalidToken) for o in outcomes)
    assert issuer.jwks_requests == 2  # the first fetch, and one for the whole burst


async def test_algorithm_confusion_and_unsigned_tokens_are_refused(issuer: Issuer, tmp_path: Path) -> None:
    issuer.add_key("k1")
    verifier = verifier_for(issuer, tmp_path)
    claims = {"iss": issuer.url, "aud": "orderstream", "sub": "x", "exp": int(time.time()) + 60}
    # "signed" with the public key as an HMAC secret (the classic algorithm confusion)
    public_pem = (
        issuer.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'k1', 'typ': 'JWT'})}.{_b64(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    hmac_token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})
    for token in (hmac_token, unsigned):
        with pytest.raises(InvalidToken):
            await verifier.verify(token)


def _b64(part: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


async def test_claims_are_checked(issuer: Issuer, tmp_path: Path) -> None:
    issuer.add_key("k1")
    verifier = verifier_for(issuer, tmp_path)
    now = int(time.time())
    for token, reason in [
        (issuer.token("k1", exp=now - 120), "expired"),
        (issuer.token("k1", nbf=now + 600), "not valid yet"),
        (issuer.token("k1", aud="another-api"), "audience"),
        (issuer.token("k1", iss="http://elsewhere"), "issuer"),
    ]:
        with pytest.raises(InvalidToken, match=reason):
            await verifier.verify(token)
    # within the 30 s leeway: accepted
    assert (await verifier.verify(issuer.token("k1", exp=now - 5))).subject == "ada"


async def test_odd_claims_from_a_trusted_issuer_are_not_a_500(issuer: Issuer, tmp_path: Path) -> None:
    """Claims a misconfigured mapper could produce, in a validly signed token: a role
    that is a list or an object is no role; an expiry too large for a float is kept
    (PyJWT accepted it) without an OverflowError."""
    issuer.add_key("k1")
    verifier = verifier_for(issuer, tmp_path)
    nested = issuer.token("k1", realm_access={"roles": [["admin"], {"a": 1}, "support"]})
    assert (await verifier.verify(nested)).roles == {Role.SUPPORT}
    for blank in ("", "  "):  # an empty identity would be every customer's (the list filter fell away)
        with pytest.raises(InvalidToken, match="subject is empty"):
            await verifier.verify(issuer.token("k1", sub=blank, roles=("customer",)))
    huge = issuer.token("k1", exp=10**400)
    principal = await verifier.verify(huge)
    assert principal.roles == {Role.ADMIN}
    assert await verifier.verify(huge) is principal  # kept: the second call is the cache's
