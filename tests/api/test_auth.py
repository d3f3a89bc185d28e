"""Identity and access, against each identity provider (see ``tests/api/idp.py``):
the local issuer always, the real Keycloak when ``make test`` started one.

Every route but ``/health``, ``/ready`` and the OpenAPI document needs a verified
bearer token; the roles in it decide what it may do; a customer sees only its own
orders (another's is a 404, like a missing one); a bad token never reaches a
handler; writes are rate-limited per identity.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from orderstream.auth.local_issuer import LOCAL_ISSUER, ensure_signing_key
from orderstream.auth.policy import PUBLIC, ROUTE_ROLES
from orderstream.config import Settings
from orderstream.domain import orders
from tests.api.helpers import assert_problem, order_body
from tests.api.idp import KEYCLOAK_HOW, IdP, keycloak_url, rotate_keycloak_key
from tests.conftest import MakeClient
from tests.tokens import bearer, token_for

PRODUCT = {"sku": "SKU-1", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}


@pytest.fixture
def read_store_url() -> str:
    """Access rules do not depend on the read store: SQLite only."""
    return ""


def _keycloak(tmp_path: Path) -> IdP:
    url = keycloak_url()
    if url is None:
        pytest.skip(KEYCLOAK_HOW)
    return IdP("keycloak", tmp_path / "app", keycloak_url=url)


@pytest.fixture(params=["local", "keycloak"])
def idp(request: pytest.FixtureRequest, tmp_path: Path) -> IdP:
    if request.param == "keycloak":
        return _keycloak(tmp_path)
    return IdP("local", tmp_path / "app")


@pytest.fixture
def keycloak_idp(tmp_path: Path) -> IdP:
    """Keycloak only (``make test`` starts it): for what only a real identity provider does."""
    return _keycloak(tmp_path)


@pytest.fixture
async def shop(make_client: MakeClient, idp: IdP) -> AsyncIterator[tuple[httpx.AsyncClient, Any, IdP]]:
    """An anonymous client of an app trusting ``idp``, with a stocked product and one
    order each for alice and bob (placed with their own tokens)."""
    async with make_client(token=None, **idp.settings()) as (client, container):
        inventory = await idp.headers("ivy")
        assert (await client.post("/products", json=PRODUCT, headers=inventory)).status_code == 201
        stocked = await client.post("/products/SKU-1/stock", json={"quantity": 50}, headers=inventory)
        assert stocked.status_code == 200, stocked.text
        yield client, container, idp


async def place_for(client: httpx.AsyncClient, idp: IdP, user: str, customer_id: str) -> str:
    placed = await client.post(
        "/orders", json=order_body(("SKU-1", 1), customer_id=customer_id), headers=await idp.headers(user)
    )
    assert placed.status_code == 201, placed.text
    return str(placed.json()["id"])


async def test_anonymous_calls_get_401_with_the_bearer_challenge(shop: Any) -> None:
    client, container, _idp = shop
    head = await container.event_store.head_position()
    for method, path in [
        ("GET", "/orders"),
        ("GET", "/products"),
        ("POST", "/products"),
        ("GET", "/orders/x/events"),
    ]:
        answer = await client.request(method, path, json=PRODUCT if method == "POST" else None)
        assert_problem(answer, 401, "unauthorized")
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "invalid_token" not in answer.headers["www-authenticate"]  # none was sent
    assert await container.event_store.head_position() == head
    for path in ("/health", "/ready", "/schema/openapi.json", "/schema", "/metrics"):
        assert (await client.get(path)).status_code == 200, path


async def test_customers_see_and_touch_only_their_own_orders(shop: Any) -> None:
    client, container, idp = shop
    alice, bob = await idp.headers("alice"), await idp.headers("bob")
    mine = await place_for(client, idp, "alice", "cust-alice")
    theirs = await place_for(client, idp, "bob", "cust-bob")

    listed = await client.get("/orders", params={"customer_id": "cust-bob", "min_position": 0}, headers=alice)
    assert listed.status_code == 200, listed.text
    await _eventually_listed(client, alice, {mine})
    assert {o["customer_id"] for o in listed.json()["items"]} <= {"cust-alice"}

    assert (await client.get(f"/orders/{mine}/events", headers=alice)).status_code == 200
    missing = await client.get("/orders/no-such-order/events", headers=alice)
    for answer in (
        await client.get(f"/orders/{theirs}", headers=alice),
        await client.get(f"/orders/{theirs}/events", headers=alice),
        await client.get(f"/orders/{theirs}/state", headers=alice),
        await client.delete(f"/orders/{theirs}", headers=alice),
        await client.patch(
            f"/orders/{theirs}", json={"lines": [{"sku": "SKU-1", "quantity": 2}]}, headers=alice
        ),
    ):
        problem = assert_problem(answer, 404)
        assert problem["type"] == missing.json()["type"]  # the same answer as a missing order
    assert len(await container.event_store.read_stream(orders.stream_name(theirs))) == 1

    # A path that is no order id is the route's 400 for a customer as for support, not a 404
    # from the ownership check (which echoed the raw id, NUL and newline included).
    support = await idp.headers("sam")
    for bad in ("a%20b", "%00", "a%0Ab", "x" * 101):
        for who in (alice, support):
            answer = await client.get(f"/orders/{bad}", headers=who)
            assert_problem(answer, 400, "invalid-parameter")

    # placing an order for another customer: 403, nothing written
    head = await container.event_store.head_position()
    assert_problem(await client.post("/orders", json=order_body(customer_id="cust-alice"), headers=bob), 403)
    assert await container.event_store.head_position() == head

    cancelled = await client.delete(f"/orders/{mine}", headers=alice)
    assert cancelled.status_code == 200, cancelled.text


async def _eventually_listed(client: httpx.AsyncClient, headers: dict[str, str], wanted: set[str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        page = (await client.get("/orders", headers=headers)).json()
        ids = {o["id"] for o in page["items"]}
        if ids == wanted or time.monotonic() > deadline:
            assert ids == wanted
            return
        await asyncio.sleep(0.05)


async def test_roles_decide_what_each_caller_may_do(shop: Any) -> None:
    client, container, idp = shop
    alice, sam, ivy, ada = [await idp.headers(u) for u in ("alice", "sam", "ivy", "ada")]
    order = await place_for(client, idp, "bob", "cust-bob")

    assert_problem(await client.post("/products/SKU-1/stock", json={"quantity": 1}, headers=alice), 403)
    assert_problem(await client.get("/orders", headers=ivy), 403)
    assert_problem(await client.get(f"/orders/{order}", headers=ivy), 403)
    assert_problem(await client.post("/orders", json=order_body(customer_id="cust-bob"), headers=sam), 403)
    assert_problem(await client.post("/products", json={**PRODUCT, "sku": "SKU-2"}, headers=sam), 403)
    assert (await client.get("/products", headers=alice)).status_code == 200

    # support reads any order and its history, and cancels it
    assert (await client.get(f"/orders/{order}/events", headers=sam)).status_code == 200
    cancelled = await client.delete(f"/orders/{order}", headers=sam)
    assert cancelled.status_code == 200, cancelled.text
    # admin: everything
    assert (await client.post("/products", json={**PRODUCT, "sku": "SKU-2"}, headers=ada)).status_code == 201
    assert (await client.get(f"/orders/{order}/state", headers=ada)).status_code == 200

    # the subject and its roles are in every event's metadata
    stream = await container.event_store.read_stream(orders.stream_name(order))
    placed, cancel = stream[0].metadata, stream[-1].metadata
    expected_bob = "bob" if idp.name == "local" else None
    assert placed.roles == "customer"
    assert cancel.roles == "support"
    if expected_bob is not None:
        assert placed.actor == "bob"
        assert cancel.actor == "sam"
    else:  # Keycloak's sub is the user's id
        assert placed.actor
        assert cancel.actor
        assert placed.actor != cancel.actor


async def test_a_cancel_without_a_reason_says_who_cancelled(shop: Any) -> None:
    """By role: a cancel by support was recorded as "cancelled by the customer"."""
    client, _container, idp = shop
    reasons = {}
    for user in ("alice", "sam"):
        order_id = await place_for(client, idp, "alice", "cust-alice")
        cancelled = await client.delete(f"/orders/{order_id}", headers=await idp.headers(user))
        assert cancelled.status_code == 200, cancelled.text
        history = await client.get(f"/orders/{order_id}/events", headers=await idp.headers("sam"))
        reasons[user] = history.json()["events"][-1]["data"]["reason"]
    assert reasons == {"alice": "cancelled by the customer", "sam": "cancelled by support"}


async def test_expired_tampered_and_foreign_tokens_never_reach_a_handler(shop: Any, tmp_path: Path) -> None:
    client, container, idp = shop
    good = await idp.token("ada")
    header, payload, signature = good.split(".")
    tampered_payload = payload[:-4] + ("AAAA" if not payload.endswith("AAAA") else "BBBB")
    foreign = token_for(tmp_path / "another-server", "admin")  # signed by another key
    expired = _local_token(idp, exp_offset=-3600)
    wrong_audience = _local_token(idp, aud="someone-else")
    unsigned = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, None, algorithm="none")
    head = await container.event_store.head_position()
    for token in [
        f"{header}.{tampered_payload}.{signature}",
        f"{header}.{payload}.{signature[:-4]}AAAA",
        foreign,
        expired,
        wrong_audience,
        unsigned,
        "not-a-jwt",
    ]:
        # a malformed body behind a bad token: 401, so the body was never looked at
        answer = await client.post(
            "/orders", content=b"{not json", headers={**bearer(token), "content-type": "application/json"}
        )
        assert_problem(answer, 401, "unauthorized")
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert await container.event_store.head_position() == head


def _local_token(idp: IdP, *, exp_offset: int = 3600, aud: str = "orderstream") -> str:
    """A token signed by the key the app trusts when it is the local issuer; for
    Keycloak, one signed by a key it does not know (refused all the same)."""
    key = ensure_signing_key(idp.data_dir if idp.name == "local" else idp.data_dir / "elsewhere")
    now = int(time.time())
    claims = {
        "iss": idp.issuer or LOCAL_ISSUER,
        "aud": aud,
        "sub": "ada",
        "exp": now + exp_offset,
        "realm_access": {"roles": ["admin"]},
    }
    return jwt.encode(claims, key.key, algorithm="EdDSA", headers={"kid": key.key_id})


async def test_writes_are_rate_limited_per_identity(make_client: MakeClient, idp: IdP) -> None:
    async with make_client(token=None, **idp.settings(write_rate_limit="3/minute")) as (client, _container):
        ivy, ada = await idp.headers("ivy"), await idp.headers("ada")
        for i in range(3):
            answer = await client.post("/products", json={**PRODUCT, "sku": f"SKU-{i}"}, headers=ivy)
            assert answer.status_code == 201, answer.text
        limited = await client.post("/products", json={**PRODUCT, "sku": "SKU-9"}, headers=ivy)
        assert_problem(limited, 429, "too-many-requests")
        assert int(limited.headers["retry-after"]) >= 1
        assert (await client.get("/products", headers=ivy)).status_code == 200  # reads are not limited
        # another identity has its own budget; admins (operators, load tools) are exempt
        for i in range(5):
            assert (
                await client.post("/products", json={**PRODUCT, "sku": f"A-{i}"}, headers=ada)
            ).status_code == 201


async def test_the_openapi_document_declares_the_scheme_in_force(
    make_client: MakeClient, tmp_path: Path
) -> None:
    async with make_client(token=None) as (client, _container):
        spec = (await client.get("/schema/openapi.json")).json()
    operations = {
        op["operationId"]: op
        for item in spec["paths"].values()
        for op in item.values()
        if isinstance(op, dict)
    }
    assert set(operations) <= set(ROUTE_ROLES)  # every operation has a line in the access table
    assert spec["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    for operation_id, operation in operations.items():
        if ROUTE_ROLES[operation_id] == PUBLIC or operation_id == "metrics":
            assert not operation.get("security"), operation_id
        else:
            assert operation["security"] == [{"BearerToken": []}], operation_id
            assert {"401", "403"} <= set(operation["responses"]), operation_id

    async with make_client(token=None, auth_enabled=False) as (client, container):
        spec = (await client.get("/schema/openapi.json")).json()
        assert "securitySchemes" not in spec.get("components", {})
        assert not any(op.get("security") for item in spec["paths"].values() for op in item.values())
        ready = (await client.get("/ready")).json()
        assert ready["auth"] == "off"
        assert "OFF" in ready["warning"]
        # auth off: anyone may write, recorded as anonymous
        assert (await client.post("/products", json=PRODUCT)).status_code == 201
        stored = await container.event_store.read_stream("product-SKU-1")
        assert stored[0].metadata.actor == "anonymous"


async def test_metrics_can_be_put_behind_the_admin_role(make_client: MakeClient, idp: IdP) -> None:
    async with make_client(token=None, **idp.settings(metrics_public=False)) as (client, _container):
        assert_problem(await client.get("/metrics"), 401)
        assert_problem(await client.get("/metrics", headers=await idp.headers("sam")), 403)
        assert (await client.get("/metrics", headers=await idp.headers("ada"))).status_code == 200


async def test_a_keycloak_key_rotation_is_picked_up_without_restart(
    make_client: MakeClient, keycloak_idp: IdP
) -> None:
    idp = keycloak_idp
    assert idp.keycloak_url is not None
    async with make_client(token=None, **idp.settings()) as (client, _container):
        before = await idp.token("ada")
        assert (await client.get("/orders", headers=bearer(before))).status_code == 200
        kid = await rotate_keycloak_key(idp.keycloak_url)
        after = await idp.token("ada")
        assert jwt.get_unverified_header(after)["kid"] == kid != jwt.get_unverified_header(before)["kid"]
        assert (await client.get("/orders", headers=bearer(after))).status_code == 200
        assert (
            await client.get("/orders", headers=bearer(before))
        ).status_code == 200  # old key still published


async def test_an_unreachable_issuer_is_a_503_not_a_bad_token(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """The token may be fine: the client should retry, not throw it away."""
    issuer = "http://127.0.0.1:9/realms/orderstream"  # the discard port: nothing answers
    async with make_client(token=None, auth_issuer=issuer) as (client, _container):
        token = _local_token(IdP("keycloak", tmp_path / "elsewhere", keycloak_url="http://127.0.0.1:9"))
        answer = await client.get("/orders", headers=bearer(token))
        assert_problem(answer, 503, "identity-provider-unavailable")
        assert answer.headers["retry-after"]


def test_settings_name_the_local_issuer_by_default(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).auth_issuer is None
