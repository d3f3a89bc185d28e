"""The identity provider misbehaving: hung, failing, misconfigured, or handing out a
token that is not an access token (hostile run against a real Keycloak, stop 19).

A shared Keycloak must not be stopped or broken under the other tests, so the issuer
here is :class:`Issuer`: the two documents an OIDC issuer serves (discovery and
JWKS) over real HTTP, for a key made in the test, switched into each fault. It
speaks the protocol only; what a real Keycloak does (rotation, a deleted key) is
tested against the real one at the end and in ``test_auth.py``.

Before the fix:
- while the issuer hung, requests needing a key fetch queued and each ran its own
  5 s fetch after the one before failed: 6 callers were answered after 5, 10 ... 30 s;
- a failing issuer was asked once per request (40 requests, 40 fetches);
- an empty key set, a JWKS address pointing at the discovery document, or a discovery
  document without ``jwks_uri`` made every authenticated request a 500;
- a key deleted at the issuer stayed trusted by a running API until some unknown kid
  happened to come by, and a token verified before stayed trusted even then;
- Keycloak's ID tokens (``typ: ID``) were accepted as access tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from orderstream.auth import verifier
from orderstream.config import Settings
from tests.api.helpers import assert_problem, order_body
from tests.api.idp import KEYCLOAK_HOW, IdP, delete_keycloak_key, keycloak_url, rotate_keycloak_key
from tests.conftest import MakeClient
from tests.tokens import bearer

FETCH_TIMEOUT = 1.0


@pytest.fixture
def read_store_url() -> str:
    """Identity does not depend on the read store: SQLite only."""
    return ""


@pytest.fixture(autouse=True)
def short_fetch_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "FETCH_TIMEOUT_SECONDS", FETCH_TIMEOUT)


class Issuer:
    """``/.well-known/openid-configuration`` and ``/jwks`` for keys made here.

    ``mode``: ``serve`` (both documents right), ``fail`` (503 on both), ``empty``
    (a JWKS with no key), ``no-jwks-uri`` (a discovery document without it)."""

    def __init__(self) -> None:
        self.mode = "serve"
        self.jwks_hits = 0
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.add_key("key-1")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token(
        self,
        settings: Settings,
        *,
        kid: str = "key-1",
        typ: str | None = None,
        header_typ: str | None = "JWT",
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": settings.auth_audience,
            "sub": f"user-{uuid.uuid4().hex[:8]}",
            "iat": now,
            "exp": now + 300,
        }
        if typ is not None:
            claims["typ"] = typ
        nested: dict[str, Any] = claims
        *parents, leaf = settings.auth_roles_claim.split(".")
        for part in parents:
            nested = nested.setdefault(part, {})
        nested[leaf] = ["admin"]
        key = self.keys.get(kid) or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        headers: dict[str, Any] = {"kid": kid, "typ": header_typ}
        return jwt.encode(claims, key, algorithm="RS256", headers=headers)

    def _jwks(self) -> dict[str, Any]:
        if self.mode == "empty":
            return {"keys": []}
        published = []
        for kid, key in self.keys.items():
            jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            published.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": published}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/jwks":
                    issuer.jwks_hits += 1
                if issuer.mode == "fail":
                    self._answer(503, {"error": "unavailable"})
                elif self.path == "/.well-known/openid-configuration":
                    document = {"issuer": issuer.url, "token_endpoint": f"{issuer.url}/token"}
                    if issuer.mode != "no-jwks-uri":
                        document["jwks_uri"] = f"{issuer.url}/jwks"
                    self._answer(200, document)
                elif self.path == "/jwks":
                    self._answer(200, issuer._jwks())
                else:
                    self._answer(404, {})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    served = Issuer()
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def hung_issuer() -> Iterator[str]:
    """An issuer that takes connections and never answers (a SIGSTOPped Keycloak)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _settings(tmp_path: Path, issuer_url: str, **overrides: Any) -> dict[str, Any]:
    return {"data_dir": tmp_path / "app", "auth_issuer": issuer_url, **overrides}


async def test_callers_waiting_on_a_hung_issuer_share_one_fetch(
    make_client: MakeClient, tmp_path: Path, hung_issuer: str, issuer: Issuer
) -> None:
    """Six callers at once: all 503 within one fetch's timeout (was 5, 10, ... 30 s)."""
    overrides = _settings(tmp_path, hung_issuer, auth_jwks_url=f"{hung_issuer}/jwks")
    async with make_client(token=None, **overrides) as (client, _container):
        settings = Settings(**overrides)
        tokens = [issuer.token(settings, kid=f"kid-{n}") for n in range(6)]
        started = time.monotonic()
        answers = await asyncio.gather(*(client.get("/orders", headers=bearer(t)) for t in tokens))
        took = time.monotonic() - started
        for answer in answers:
            assert_problem(answer, 503, "identity-provider-unavailable")
            assert answer.headers["retry-after"]
        assert took < 2 * FETCH_TIMEOUT + 1.0, took
        # Inside the second after the failed fetch, an unknown key is answered at once.
        started = time.monotonic()
        assert_problem(await client.get("/orders", headers=bearer(tokens[0])), 503)
        assert time.monotonic() - started < FETCH_TIMEOUT / 2


async def test_a_failing_issuer_is_asked_at_most_once_a_second(
    make_client: MakeClient, tmp_path: Path, issuer: Issuer
) -> None:
    issuer.mode = "fail"
    overrides = _settings(tmp_path, issuer.url, auth_jwks_url=f"{issuer.url}/jwks")
    async with make_client(token=None, **overrides) as (client, _container):
        settings = Settings(**overrides)
        started = time.monotonic()
        for n in range(40):
            forged = issuer.token(settings, kid=f"made-up-{n}")
            assert_problem(await client.get("/orders", headers=bearer(forged)), 503)
        burst = [issuer.token(settings, kid=f"burst-{n}") for n in range(20)]
        for answer in await asyncio.gather(*(client.get("/orders", headers=bearer(t)) for t in burst)):
            assert_problem(answer, 503, "identity-provider-unavailable")
        seconds = time.monotonic() - started
        assert issuer.jwks_hits <= seconds / verifier.MIN_REFETCH_SECONDS + 1, (issuer.jwks_hits, seconds)


async def test_the_keys_held_keep_working_while_the_issuer_is_down(
    make_client: MakeClient, tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = _settings(tmp_path, issuer.url)
    async with make_client(token=None, **overrides) as (client, _container):
        settings = Settings(**overrides)
        assert (await client.get("/orders", headers=bearer(issuer.token(settings)))).status_code == 200
        issuer.mode = "fail"
        monkeypatch.setattr(verifier, "MAX_KEY_AGE_SECONDS", 0.0)  # every request finds the set aged
        for _ in range(5):
            fresh = issuer.token(settings)  # a token not seen yet, signed with the held key
            assert (await client.get("/orders", headers=bearer(fresh))).status_code == 200
            await asyncio.sleep(0.3)
        # A key that was never fetched cannot be trusted: 503 (the token may be fine).
        issuer.add_key("key-2")
        assert_problem(await client.get("/orders", headers=bearer(issuer.token(settings, kid="key-2"))), 503)
        # The issuer back: the new key is fetched and trusted, no restart.
        issuer.mode = "serve"
        await asyncio.sleep(verifier.MIN_REFETCH_SECONDS)
        assert (
            await client.get("/orders", headers=bearer(issuer.token(settings, kid="key-2")))
        ).status_code == 200


async def test_the_issuer_going_down_and_back_is_logged_once_each(
    make_client: MakeClient, tmp_path: Path, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = _settings(tmp_path, issuer.url, auth_jwks_url=f"{issuer.url}/jwks")
    issuer.mode = "fail"
    async with make_client(token=None, **overrides) as (client, _container):
        settings = Settings(**overrides)
        with caplog.at_level(logging.INFO, logger="orderstream.auth"):
            for _ in range(3):
                assert_problem(await client.get("/orders", headers=bearer(issuer.token(settings))), 503)
                await asyncio.sleep(verifier.MIN_REFETCH_SECONDS)
            issuer.mode = "serve"
            assert (await client.get("/orders", headers=bearer(issuer.token(settings)))).status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "orderstream.auth"]
    (went,) = [m for m in messages if "the keys held are kept" in m]
    assert went.startswith("identity provider: the issuer's keys cannot be fetched now"), went
    assert "503" in went, went  # the cause, for the operator
    assert [m for m in messages if "fetched again" in m] == [
        "identity provider: its keys are fetched again (1 held)"
    ]


@pytest.mark.parametrize(
    ("mode", "jwks_path"),
    [
        ("empty", "/jwks"),  # a key set with no key
        ("serve", "/.well-known/openid-configuration"),  # the JWKS address set to the discovery document
        ("no-jwks-uri", None),  # a discovery document without jwks_uri
    ],
)
async def test_a_misconfigured_issuer_is_a_503_and_nothing_is_written(
    make_client: MakeClient, tmp_path: Path, issuer: Issuer, mode: str, jwks_path: str | None
) -> None:
    """Was a 500 on every authenticated request."""
    issuer.mode = mode
    jwks_url = f"{issuer.url}{jwks_path}" if jwks_path else None
    overrides = _settings(tmp_path, issuer.url, auth_jwks_url=jwks_url)
    async with make_client(token=None, **overrides) as (client, container):
        token = issuer.token(Settings(**overrides))
        assert_problem(
            await client.get("/orders", headers=bearer(token)), 503, "identity-provider-unavailable"
        )
        placed = await client.post("/orders", json=order_body(("SKU-1", 1)), headers=bearer(token))
        assert_problem(placed, 503, "identity-provider-unavailable")
        assert await container.event_store.head_position() is None


@pytest.mark.parametrize(
    ("typ", "header_typ", "accepted"),
    [
        (None, "JWT", True),
        ("Bearer", "JWT", True),  # Keycloak's access token
        (None, "at+jwt", True),  # RFC 9068
        ("ID", "JWT", False),  # Keycloak's ID token
        ("Refresh", "JWT", False),
        ("Logout", "logout+jwt", False),
        (None, "logout+jwt", False),
        (None, "id_token+jwt", False),
    ],
)
async def test_only_access_tokens_are_accepted(
    make_client: MakeClient,
    tmp_path: Path,
    issuer: Issuer,
    typ: str | None,
    header_typ: str,
    accepted: bool,
) -> None:
    overrides = _settings(tmp_path, issuer.url)
    async with make_client(token=None, **overrides) as (client, _container):
        token = issuer.token(Settings(**overrides), typ=typ, header_typ=header_typ)
        answer = await client.get("/orders", headers=bearer(token))
        if accepted:
            assert answer.status_code == 200, answer.text
        else:
            problem = assert_problem(answer, 401, "unauthorized")
            assert "not an access token" in problem["detail"]


async def test_a_key_deleted_at_keycloak_stops_being_trusted(
    make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual answer to a leaked key is to delete it at the issuer; a running API
    must stop trusting it (its tokens, verified before or not) without a restart."""
    url = keycloak_url()
    if url is None:
        pytest.skip(KEYCLOAK_HOW)
    idp = IdP("keycloak", tmp_path / "app", keycloak_url=url)
    async with make_client(token=None, **idp.settings()) as (client, _container):
        verified_before, unseen_before = await idp.token("ada"), await idp.token("alice")
        assert (await client.get("/orders", headers=bearer(verified_before))).status_code == 200
        old_kid = jwt.get_unverified_header(verified_before)["kid"]
        new_kid = await rotate_keycloak_key(url)
        after = await idp.token("ada")
        assert (await client.get("/orders", headers=bearer(after))).status_code == 200
        await delete_keycloak_key(url, old_kid)
        monkeypatch.setattr(verifier, "MAX_KEY_AGE_SECONDS", 0.0)  # the set's age reached
        deadline = time.monotonic() + 10
        while (await client.get("/orders", headers=bearer(verified_before))).status_code == 200:
            assert time.monotonic() < deadline, "a deleted key is still trusted"
            await asyncio.sleep(0.2)
        for token in (verified_before, unseen_before):
            problem = assert_problem(await client.get("/orders", headers=bearer(token)), 401)
            assert "does not publish" in problem["detail"]
        assert jwt.get_unverified_header(after)["kid"] == new_kid
        assert (await client.get("/orders", headers=bearer(after))).status_code == 200
