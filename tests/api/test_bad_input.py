"""Bad input never gets a 500 and never writes: each case is a 4xx problem and the
event store's head position is unchanged afterwards."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from orderstream.container import Container
from tests.api.helpers import ADDRESS, assert_problem, order_body, place_order, register_product

Body = dict[str, Any]


def changed(fn: Callable[[Body], None]) -> Body:
    body = order_body(("SKU-1", 1))
    fn(body)
    return body


def _set(path: str, value: Any) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        target: Any = body
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return apply


def _drop(path: str) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        target: Any = body
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]

    return apply


def _many_lines(count: int) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        body["lines"] = [{"sku": f"SKU-{i}", "quantity": 1} for i in range(count)]

    return apply


# (id, raw body bytes or JSON body, expected status, expected problem type suffix)
ORDER_CASES: list[tuple[str, bytes | Body, int, str]] = [
    ("malformed json", b'{"customer_id": "c1", "lines": [', 400, "malformed-json"),
    ("not json at all", b"customer_id=c1", 400, "malformed-json"),
    ("empty body", b"", 400, "malformed-json"),
    ("json array", b"[]", 422, "invalid-body"),
    ("json nested 700 levels", b"[" * 700 + b"]" * 700, 422, "invalid-body"),
    ("json nested 30,000 levels", b"[" * 30_000 + b"]" * 30_000, 422, "invalid-body"),
    (
        "a field nested 30,000 levels",
        b'{"customer_id": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        422,
        "invalid-body",
    ),
    ("json null", b"null", 422, "invalid-body"),
    ("quantity as string", changed(_set("lines.0.quantity", "2")), 422, "invalid-body"),
    ("quantity as float", changed(_set("lines.0.quantity", 1.5)), 422, "invalid-body"),
    ("quantity as bool", changed(_set("lines.0.quantity", True)), 422, "invalid-body"),
    ("customer id as number", changed(_set("customer_id", 7)), 422, "invalid-body"),
    ("lines as object", changed(_set("lines", {"sku": "SKU-1"})), 422, "invalid-body"),
    ("unknown top-level field", changed(_set("discount", 50)), 422, "invalid-body"),
    ("unknown field in a line", changed(_set("lines.0.price", 1)), 422, "invalid-body"),
    ("unknown field in the address", changed(_set("shipping_address.floor", "3")), 422, "invalid-body"),
    ("unknown field in payment", changed(_set("payment_method.cvv", "123")), 422, "invalid-body"),
    ("missing field", changed(_drop("customer_id")), 422, "invalid-body"),
    ("missing nested field", changed(_drop("shipping_address.city")), 422, "invalid-body"),
    ("zero quantity", changed(_set("lines.0.quantity", 0)), 422, "invalid-body"),
    ("negative quantity", changed(_set("lines.0.quantity", -3)), 422, "invalid-body"),
    ("quantity over the limit", changed(_set("lines.0.quantity", 10_001)), 422, "invalid-body"),
    ("absurd quantity", changed(_set("lines.0.quantity", 10**30)), 422, "invalid-body"),
    ("no lines", changed(_set("lines", [])), 422, "invalid-body"),
    ("101 lines", changed(_many_lines(101)), 422, "invalid-body"),
    ("bad sku pattern", changed(_set("lines.0.sku", "../etc/passwd")), 422, "invalid-body"),
    ("empty customer id", changed(_set("customer_id", "")), 422, "invalid-body"),
    ("long name", changed(_set("shipping_address.name", "x" * 201)), 422, "invalid-body"),
    ("lower-case country", changed(_set("shipping_address.country", "gb")), 422, "invalid-body"),
    ("empty token", changed(_set("payment_method.token", "")), 422, "invalid-body"),
    ("same sku twice", changed(_set("lines", [{"sku": "SKU-1", "quantity": 1}] * 2)), 422, "invalid-command"),
    ("unknown product", changed(_set("lines.0.sku", "GHOST-9")), 422, "unknown-product"),
]


@pytest.fixture
async def seeded(client: httpx.AsyncClient) -> httpx.AsyncClient:
    await register_product(client, "SKU-1")
    return client


@pytest.mark.parametrize(
    ("body", "status", "kind"), [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES]
)
async def test_bad_order_bodies(
    seeded: httpx.AsyncClient, container: Container, body: bytes | Body, status: int, kind: str
) -> None:
    head = await container.event_store.head_position()
    if isinstance(body, bytes):
        response = await seeded.post("/orders", content=body, headers={"content-type": "application/json"})
    else:
        response = await seeded.post("/orders", json=body)
    problem = assert_problem(response, status, kind)
    if status == 422 and kind == "invalid-body":
        assert problem["errors"], problem
    assert await container.event_store.head_position() == head


async def test_validation_errors_point_at_the_field(seeded: httpx.AsyncClient) -> None:
    response = await seeded.post("/orders", json=changed(_set("lines.0.quantity", 0)))
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["path"] == "$.lines[0].quantity"


async def test_oversized_body_is_413(seeded: httpx.AsyncClient, container: Container) -> None:
    head = await container.event_store.head_position()
    body = order_body()
    body["shipping_address"]["name"] = "x" * (70 * 1024)
    response = await seeded.post("/orders", json=body)
    assert_problem(response, 413, "body-too-large")
    assert await container.event_store.head_position() == head


STOCK_CASES: list[tuple[str, Any, int]] = [
    ("zero", {"quantity": 0}, 422),
    ("negative", {"quantity": -1}, 422),
    ("over a million", {"quantity": 1_000_001}, 422),
    ("string", {"quantity": "5"}, 422),
    ("unknown field", {"quantity": 5, "note": "x"}, 422),
    ("missing", {}, 422),
]


@pytest.mark.parametrize(("body", "status"), [c[1:] for c in STOCK_CASES], ids=[c[0] for c in STOCK_CASES])
async def test_bad_stock_additions(
    seeded: httpx.AsyncClient, container: Container, body: Any, status: int
) -> None:
    head = await container.event_store.head_position()
    assert_problem(await seeded.post("/products/SKU-1/stock", json=body), status)
    assert await container.event_store.head_position() == head


PRODUCT_CASES: list[tuple[str, Any]] = [
    ("sku with a final newline", {"sku": "SKU-9\n", "name": "n", "price": {"amount": 1, "currency": "EUR"}}),
    (
        "name with a final newline",
        {"sku": "SKU-9", "name": "Red mug\n", "price": {"amount": 1, "currency": "EUR"}},
    ),
    ("bad currency", {"sku": "SKU-9", "name": "n", "price": {"amount": 1, "currency": "eur"}}),
    ("negative price", {"sku": "SKU-9", "name": "n", "price": {"amount": -1, "currency": "EUR"}}),
    ("bad sku", {"sku": "-x", "name": "n", "price": {"amount": 1, "currency": "EUR"}}),
    ("empty name", {"sku": "SKU-9", "name": "", "price": {"amount": 1, "currency": "EUR"}}),
    ("unknown nested", {"sku": "SKU-9", "name": "n", "price": {"amount": 1, "currency": "EUR", "vat": 1}}),
]


@pytest.mark.parametrize("body", [c[1] for c in PRODUCT_CASES], ids=[c[0] for c in PRODUCT_CASES])
async def test_bad_product_registrations(seeded: httpx.AsyncClient, container: Container, body: Any) -> None:
    head = await container.event_store.head_position()
    assert_problem(await seeded.post("/products", json=body), 422, "invalid-body")
    assert await container.event_store.head_position() == head


async def test_bad_headers_and_changes(seeded: httpx.AsyncClient, container: Container) -> None:
    order_id = (await place_order(seeded))["id"]
    head = await container.event_store.head_position()
    url = f"/orders/{order_id}"
    for if_match in ['W/"0"', '"abc"', '"0", "1"', "-1", '"99999999999999999999"']:
        response = await seeded.patch(url, json={"shipping_address": ADDRESS}, headers={"If-Match": if_match})
        assert_problem(response, 400, "invalid-header")
    assert_problem(await seeded.patch(url, json={}), 422, "nothing-to-change")
    assert_problem(
        await seeded.post("/orders", json=order_body(), headers={"Idempotency-Key": "x" * 300}), 400
    )
    assert_problem(await seeded.delete(url, params={"reason": "x" * 201}), 400, "invalid-parameter")
    assert await container.event_store.head_position() == head


async def test_a_header_sent_twice_is_refused_not_half_read(
    seeded: httpx.AsyncClient, container: Container
) -> None:
    """Two If-Match lines are a list, and a list is refused: reading only the first
    (``*``) let a write guarded by a stale tag go through unguarded. The same for the
    other headers that must come once, and "01" is not the tag "1"."""
    order_id = (await place_order(seeded))["id"]
    changed = await seeded.patch(f"/orders/{order_id}", json={"shipping_address": ADDRESS})
    assert changed.status_code == 200  # revision 1: the tag "0" is stale
    head = await container.event_store.head_position()
    url = f"/orders/{order_id}"
    json_type = ("content-type", "application/json")
    body = json.dumps({"shipping_address": ADDRESS}).encode()
    for headers in (
        [("If-Match", "*"), ("If-Match", '"0"')],
        [("If-Match", '"1"'), ("If-Match", '"1"')],
        [("content-type", "text/plain")],
    ):
        response = await seeded.patch(url, content=body, headers=[json_type, *headers])
        assert_problem(response, 400, "invalid-header")
    # A second token (httpx would merge it into the client's, so it is added to the request).
    request = seeded.build_request("PATCH", url, content=body, headers=[json_type])
    token = seeded.headers["authorization"].encode()
    request.headers = httpx.Headers([*request.headers.raw, (b"authorization", token)])
    assert_problem(await seeded.send(request), 400, "invalid-header")
    placed = json.dumps(order_body()).encode()
    twice = [json_type, ("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")]
    assert_problem(await seeded.post("/orders", content=placed, headers=twice), 400, "invalid-header")
    leading_zero = await seeded.patch(url, content=body, headers=[json_type, ("If-Match", '"01"')])
    assert_problem(leading_zero, 400, "invalid-header")
    assert await container.event_store.head_position() == head


@pytest.mark.parametrize(
    "reason",
    ["\x00", "\x1b[31mred", "\u202etxt.exe", "two\nlines", "\u200b", "   ", "changed my mind\n"],
    ids=["nul", "escape", "rtl-override", "newline", "zero-width", "blank", "final-newline"],
)
async def test_a_cancel_reason_is_printable_text(
    seeded: httpx.AsyncClient, container: Container, reason: str
) -> None:
    order_id = (await place_order(seeded))["id"]
    head = await container.event_store.head_position()
    assert_problem(
        await seeded.delete(f"/orders/{order_id}", params={"reason": reason}), 400, "invalid-parameter"
    )
    assert await container.event_store.head_position() == head


@pytest.mark.parametrize(
    "name",
    [
        "\u200b",
        "\u200b\u200d",
        "a\u2028b",
        "a\u2029b",
        "\u3164",
        "\u2800\u2800",
        "\u115f\u1160",
        "\u200f",
        "\u00ad",
        "\ufff9",
    ],
    ids=[
        "zwsp",
        "joiners",
        "line-sep",
        "para-sep",
        "hangul-filler",
        "braille-blank",
        "choseong",
        "rlm-only",
        "soft-hyphen",
        "annotation-anchor",
    ],
)
async def test_invisible_or_line_breaking_names_are_refused(
    seeded: httpx.AsyncClient, container: Container, name: str
) -> None:
    head = await container.event_store.head_position()
    body = order_body()
    body["shipping_address"]["name"] = name
    assert_problem(await seeded.post("/orders", json=body), 422, "invalid-body")
    assert await container.event_store.head_position() == head


@pytest.mark.parametrize(
    "name",
    [
        "\u05e9\u05e8\u05d4 \u05dc\u05d5\u05d9\u200f",  # Hebrew with a right-to-left mark, as copied
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian with a zero-width non-joiner
        "Zo\u00eb \U0001f469\u200d\U0001f4bb",  # an emoji sequence joined by ZWJ
        "\u2764\ufe0f Tea",  # a variation selector after an emoji
        "\ud55c\uad6d \uc0ac\ub78c",  # Hangul syllables (not fillers)
    ],
    ids=["hebrew-rlm", "persian-zwnj", "emoji-zwj", "variation-selector", "hangul"],
)
async def test_names_in_any_script_are_kept_as_written(seeded: httpx.AsyncClient, name: str) -> None:
    body = order_body()
    body["shipping_address"]["name"] = name
    placed = await seeded.post("/orders", json=body)
    assert placed.status_code == 201, placed.text
    order_id = placed.json()["id"]
    events = (await seeded.get(f"/orders/{order_id}/events")).json()["events"]
    assert events[0]["data"]["shipping_address"]["name"] == name


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"status": "lost"},
        {"sort": "password"},
        {"sort": "-placed_at,-placed_at"},
        {"cursor": "not-a-cursor"},
        {"min_position": "-1"},
    ],
    ids=lambda q: "&".join(f"{k}={v}" for k, v in q.items()),
)
async def test_bad_list_queries_are_400(seeded: httpx.AsyncClient, query: dict[str, str]) -> None:
    written = await place_order(seeded)
    # Once the order is visible the collection surely exists (a cursor is checked against it).
    ok = await seeded.get("/orders", params={"min_position": written["position"]})
    assert ok.status_code == 200
    assert_problem(await seeded.get("/orders", params=query), 400)


@pytest.mark.parametrize("path", ["/orders", "/products"])
@pytest.mark.parametrize("text", ["tea\x00x", "\x00tea", "tea\x1b[31m"], ids=["nul", "leading-nul", "escape"])
async def test_control_characters_in_a_search_are_400(
    seeded: httpx.AsyncClient, path: str, text: str
) -> None:
    assert_problem(await seeded.get(path, params={"q": text}), 400, "invalid-parameter")


async def test_bad_path_and_query_values(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/orders/not%20an%20id"), 400, "invalid-parameter")
    assert_problem(await client.get("/orders/abc%0A"), 400, "invalid-parameter")  # a final newline
    assert_problem(await client.get("/orders/x/state", params={"revision": "-1"}), 400, "invalid-parameter")
    assert_problem(await client.get("/no-such-route"), 404, "no-such-route")
    assert_problem(await client.put("/orders"), 405, "method-not-allowed")


async def test_unexpected_errors_are_500_problems_without_internals(
    client: httpx.AsyncClient, container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("secret internals: /var/db/password")

    monkeypatch.setattr(container.queries, "get_order", boom)
    response = await client.get("/orders/abc")
    problem = assert_problem(response, 500, "internal-error")
    assert "secret" not in response.text
    assert problem["correlation_id"] == response.headers["x-correlation-id"]


def test_cases_do_not_share_state() -> None:
    # The table builds each body from a fresh copy of the template.
    assert ORDER_CASES[5][1] is not ORDER_CASES[6][1]
    assert copy.deepcopy(order_body()) == order_body()


# ------------------------------------------------- finding 6 of issue 12: what still got through

RAW_ORDER_CASES: list[tuple[str, bytes]] = [
    (
        "a key twice at the top",
        b'{"customer_id": "c1", "customer_id": "c2", "lines": [{"sku": "SKU-1", "quantity": 1}],'
        b' "shipping_address": {"name": "A", "line1": "l", "city": "c", "postal_code": "1", "country": "GB"},'
        b' "payment_method": {"token": "tok_approve"}}',
    ),
    (
        "a key twice in a line",
        b'{"customer_id": "c1", "lines": [{"sku": "SKU-1", "quantity": 1, "quantity": 900}],'
        b' "shipping_address": {"name": "A", "line1": "l", "city": "c", "postal_code": "1", "country": "GB"},'
        b' "payment_method": {"token": "tok_approve"}}',
    ),
]


@pytest.mark.parametrize("raw", [c[1] for c in RAW_ORDER_CASES], ids=[c[0] for c in RAW_ORDER_CASES])
async def test_duplicate_json_keys_are_422(
    seeded: httpx.AsyncClient, container: Container, raw: bytes
) -> None:
    head = await container.event_store.head_position()
    response = await seeded.post("/orders", content=raw, headers={"content-type": "application/json"})
    problem = assert_problem(response, 422, "invalid-body")
    assert "more than once" in problem["errors"][0]["message"]
    assert await container.event_store.head_position() == head


async def test_colons_inside_strings_are_not_mistaken_for_repeated_keys(seeded: httpx.AsyncClient) -> None:
    body = order_body(customer_id="crm:42")
    body["shipping_address"]["line1"] = 'Flat 2: "Rear": 12 High St'
    response = await seeded.post("/orders", json=body)
    assert response.status_code == 201, response.text


ADDRESS_CASES: list[tuple[str, str, Any]] = [
    ("unassigned country ZZ", "country", "ZZ"),
    ("NUL in the name", "name", "Ada\x00Lovelace"),
    ("right-to-left override in the name", "name", "Ada \u202egpj.exe"),
    ("whitespace-only name", "name", " \t "),
    ("ideographic-space-only city", "city", "\u3000"),
    ("newline in line1", "line1", "12 Row\nInjected: header"),
    ("NUL in line2", "line2", "\x00"),
    ("whitespace-only postal code", "postal_code", "  "),
]


@pytest.mark.parametrize(
    ("field", "value"), [c[1:] for c in ADDRESS_CASES], ids=[c[0] for c in ADDRESS_CASES]
)
async def test_bad_address_values_are_422(
    seeded: httpx.AsyncClient, container: Container, field: str, value: str
) -> None:
    head = await container.event_store.head_position()
    response = await seeded.post("/orders", json=changed(_set(f"shipping_address.{field}", value)))
    problem = assert_problem(response, 422, "invalid-body")
    assert problem["errors"][0]["path"] == f"$.shipping_address.{field}"
    assert await container.event_store.head_position() == head


async def test_bad_address_in_a_change_is_422(seeded: httpx.AsyncClient, container: Container) -> None:
    order_id = (await place_order(seeded))["id"]
    head = await container.event_store.head_position()
    address = {**ADDRESS, "country": "ZZ"}
    response = await seeded.patch(f"/orders/{order_id}", json={"shipping_address": address})
    assert_problem(response, 422, "invalid-body")
    assert await container.event_store.head_position() == head


PRICE_CASES: list[tuple[str, str, Any]] = [
    ("currency XXX (no currency)", "currency", "XXX"),
    ("currency XTS (testing)", "currency", "XTS"),
    ("currency XAU (gold)", "currency", "XAU"),
    ("unassigned currency ABC", "currency", "ABC"),
    ("NUL in the name", "name", "Red\x00mug"),
    ("right-to-left override in the name", "name", "mug\u202e"),
    ("whitespace-only name", "name", "   "),
]


@pytest.mark.parametrize(("field", "value"), [c[1:] for c in PRICE_CASES], ids=[c[0] for c in PRICE_CASES])
async def test_bad_product_values_are_422(
    seeded: httpx.AsyncClient, container: Container, field: str, value: str
) -> None:
    head = await container.event_store.head_position()
    body: Body = {"sku": "SKU-9", "name": "Blue mug", "price": {"amount": 1, "currency": "EUR"}}
    if field == "currency":
        body["price"]["currency"] = value
    else:
        body[field] = value
    problem = assert_problem(await seeded.post("/products", json=body), 422, "invalid-body")
    assert problem["errors"][0]["path"] == ("$.price.currency" if field == "currency" else f"$.{field}")
    assert await container.event_store.head_position() == head


async def test_real_currencies_and_countries_pass(seeded: httpx.AsyncClient) -> None:
    """The lists are the ISO ones, not a handful: the CFA franc and the yen are
    currencies (0 minor units), Kosovo has no assigned code but Åland has."""
    for sku, currency in (("SKU-XOF", "XOF"), ("SKU-JPY", "JPY"), ("SKU-BHD", "BHD")):
        body = {"sku": sku, "name": "Mug", "price": {"amount": 5, "currency": currency}}
        assert (await seeded.post("/products", json=body)).status_code == 201
    ok = await seeded.post("/orders", json=changed(_set("shipping_address.country", "AX")))
    assert ok.status_code == 201, ok.text
    assert_problem(await seeded.post("/orders", json=changed(_set("shipping_address.country", "XK"))), 422)


async def test_a_body_without_content_type_is_415(seeded: httpx.AsyncClient, container: Container) -> None:
    head = await container.event_store.head_position()
    body = msgspec.json.encode(order_body())
    response = await seeded.post("/orders", content=body)
    assert "content-type" not in response.request.headers
    problem = assert_problem(response, 415, "unsupported-media-type")
    assert "no Content-Type" in problem["detail"]
    stock = await seeded.post("/products/SKU-1/stock", content=b'{"quantity": 1}')
    assert_problem(stock, 415, "unsupported-media-type")
    assert await container.event_store.head_position() == head


async def test_a_compressed_body_is_415(seeded: httpx.AsyncClient, container: Container) -> None:
    """A body we do not decode is a 415 (RFC 9110), not a 400 for its gzip bytes, and
    a plain body labelled ``br`` is not taken at its word either."""
    head = await container.event_store.head_position()
    body = msgspec.json.encode(order_body())
    json_type = {"content-type": "application/json"}
    for encoding, content in (("gzip", gzip.compress(body)), ("br", body), ("identity, gzip", body)):
        response = await seeded.post(
            "/orders", content=content, headers={**json_type, "content-encoding": encoding}
        )
        assert_problem(response, 415, "unsupported-media-type")
        assert response.headers["accept-encoding"] == "identity"
    assert await container.event_store.head_position() == head
    plain = await seeded.post("/orders", content=body, headers={**json_type, "content-encoding": "identity"})
    assert plain.status_code == 201, plain.text


async def test_concurrent_replays_of_one_key_all_say_replayed(
    seeded: httpx.AsyncClient, container: Container
) -> None:
    """Twenty copies of one keyed request at once: one does the work, the other
    nineteen are replays and say so, as a sequential retry does."""
    body = order_body()
    answers = await asyncio.gather(
        *(seeded.post("/orders", json=body, headers={"Idempotency-Key": "burst-f"}) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.content for a in answers}) == 1
    replayed = [a.headers.get("idempotent-replayed") for a in answers]
    assert replayed.count(None) == 1, replayed
    assert replayed.count("true") == 19, replayed
    events = await container.event_store.read_stream(f"order-{answers[0].json()['id']}")
    assert len(events) == 1
