"""The payment provider's webhook is authenticated by its signature alone, a
repeated delivery has one effect, and no card token is at rest after a full
order flow (issue 9, items 4 and 5), against the real Temporal dev server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from orderstream.api.app import create_app
from orderstream.application import webhook_signature
from orderstream.bootstrap import build
from orderstream.config import Settings, sqlite_path
from orderstream.sagas.fulfilment.inputs import payment_id_for
from tests.sagas.conftest import REPO_ROOT, SagaFactory, SagaHarness

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]


def secrets_of(saga: SagaHarness) -> tuple[str, ...]:
    settings = saga.container.settings
    return webhook_signature.webhook_secrets(settings.webhook_secrets, settings.data_dir)


async def post(saga: SagaHarness, order_id: str, raw: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers[webhook_signature.HEADER] = signature
    return await saga.http.post(f"/payments/{payment_id_for(order_id)}/webhook", content=raw, headers=headers)


def delivery(order_id: str, **fields: str) -> bytes:
    """A webhook body for the order's payment, as the provider sends it."""
    return json.dumps({"payment_id": payment_id_for(order_id), **fields}).encode()


async def pending_order(saga: SagaHarness) -> str:
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")
    return order_id


async def test_an_unsigned_or_forged_call_is_401_and_appends_nothing(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    order_id = await pending_order(saga)
    stream = f"payment-{payment_id_for(order_id)}"
    before = await saga.types(stream)
    raw = delivery(order_id, event_id="evt_1", status="authorised")
    now = int(time.time())
    secret = secrets_of(saga)[0]
    forged = {
        "missing": None,
        "empty": "",
        "malformed": "sha256=abc",
        "no v1": f"t={now}",
        "wrong secret": webhook_signature.sign(raw, ["not-the-shared-secret"], now),
        "another body": webhook_signature.sign(
            delivery(order_id, event_id="evt_1", status="declined"), [secret], now
        ),
        # Well past the 300 s window: `now` is truncated to the second and the server checks
        # a moment later, so `now + 301` passed whenever a second ticked over in between (the
        # exact boundary is tests/unit/test_webhook_signature.py's, at a fixed time).
        "too old": webhook_signature.sign(raw, [secret], now - 400),
        "too far ahead": webhook_signature.sign(raw, [secret], now + 400),
        "timestamp changed": webhook_signature.sign(raw, [secret], now).replace(f"t={now}", f"t={now - 1}"),
    }
    for case, signature in forged.items():
        response = await post(saga, order_id, raw, signature)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("invalid-signature")
        assert response.headers["www-authenticate"].startswith("Orderstream-Signature")
    # An unsigned call is refused before its body is looked at.
    assert (await post(saga, order_id, b"{not json", None)).status_code == 401
    assert await saga.types(stream) == before
    assert (await saga.status(order_id))["step"] == "await-payment-result"

    signed = await post(saga, order_id, raw, webhook_signature.sign(raw, [secret], now))
    assert signed.status_code == 200, signed.text
    assert (await saga.outcome(order_id)).status == "shipped"
    authorised = [e for e in await saga.stream(stream) if e.type == "PaymentAuthorised"]
    assert [e.metadata.actor for e in authorised] == ["payment-provider"]


async def test_a_delivery_signed_for_one_payment_is_refused_at_another(make_saga: SagaFactory) -> None:
    """The signature covers the body, not the URL: a delivery captured for one order's
    payment, sent within its 300 s to another pending payment's URL, must not
    authorise that one (and ship an unpaid order)."""
    saga = await make_saga()
    paid = await pending_order(saga)
    unpaid = await saga.place("tok_pending", ("MUG", 1))
    await saga.reach_step(unpaid, "await-payment-result")
    unpaid_stream = f"payment-{payment_id_for(unpaid)}"
    before = await saga.types(unpaid_stream)
    raw = delivery(paid, event_id="evt_captured", status="authorised", authorisation_code="A-9")
    signature = webhook_signature.sign(raw, secrets_of(saga), int(time.time()))

    assert (await post(saga, paid, raw, signature)).status_code == 200
    replayed = await post(saga, unpaid, raw, signature)

    assert replayed.status_code == 422, replayed.text
    assert replayed.headers["content-type"].startswith("application/problem+json")
    assert replayed.json()["errors"][0]["path"] == "$.payment_id"
    assert await saga.types(unpaid_stream) == before
    assert (await saga.status(unpaid))["step"] == "await-payment-result"
    assert (await saga.outcome(paid)).status == "shipped"
    # A body without its payment is refused too (the old format could be replayed anywhere).
    bare = json.dumps({"event_id": "evt_bare", "status": "authorised"}).encode()
    without = await post(saga, unpaid, bare, webhook_signature.sign(bare, secrets_of(saga), int(time.time())))
    assert without.status_code == 422, without.text
    assert await saga.types(unpaid_stream) == before


async def test_the_same_delivery_twice_has_one_effect(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    order_id = await pending_order(saga)
    raw = delivery(order_id, event_id="evt_twice", status="authorised", authorisation_code="A-1")
    signature = webhook_signature.sign(raw, secrets_of(saga), int(time.time()))

    first = await post(saga, order_id, raw, signature)
    again = await post(saga, order_id, raw, signature)  # the provider retries, or a replay

    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert (await saga.outcome(order_id)).status == "shipped"
    counts = await saga.counts(f"payment-{payment_id_for(order_id)}")
    assert counts["PaymentAuthorised"] == 1
    # The same event id with another body is not the same delivery: refused, nothing appended.
    other = delivery(order_id, event_id="evt_twice", status="declined")
    refused = await post(
        saga, order_id, other, webhook_signature.sign(other, secrets_of(saga), int(time.time()))
    )
    assert refused.status_code in (409, 422), refused.text
    assert await saga.counts(f"payment-{payment_id_for(order_id)}") == counts


async def test_copies_of_an_authorisation_after_the_capture_are_200(make_saga: SagaFactory) -> None:
    """Providers send a delivery more than once, sometimes under new event ids. A copy
    that found the payment authorised changed nothing and kept no record, so the next
    copy, after the saga captured, was a 409 "cannot authorise when captured" (hostile
    run: 1-2 of 4 concurrent copies), which a provider may take as final."""
    saga = await make_saga()
    order_id = await pending_order(saga)
    for event_id in ("evt_a", "evt_b"):
        raw = delivery(order_id, event_id=event_id, status="authorised", authorisation_code="A-1")
        answer = await post(
            saga, order_id, raw, webhook_signature.sign(raw, secrets_of(saga), int(time.time()))
        )
        assert answer.status_code == 200, answer.text
    assert (await saga.outcome(order_id)).status == "shipped"  # the payment is captured now
    stream = f"payment-{payment_id_for(order_id)}"
    counts = await saga.counts(stream)
    assert counts["PaymentCaptured"] == 1
    late = delivery(order_id, event_id="evt_b_resent", status="authorised", authorisation_code="A-1")
    answer = await post(
        saga, order_id, late, webhook_signature.sign(late, secrets_of(saga), int(time.time()))
    )
    assert answer.status_code == 200, answer.text
    declined = delivery(order_id, event_id="evt_c", status="declined")
    refused = await post(
        saga, order_id, declined, webhook_signature.sign(declined, secrets_of(saga), int(time.time()))
    )
    assert refused.status_code == 409, refused.text  # news that contradicts the capture
    assert await saga.counts(stream) == counts


async def test_no_card_token_at_rest_after_a_full_order_flow(
    make_saga: SagaFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    saga = await make_saga()
    order_id = await pending_order(saga)
    assert (await saga.webhook(order_id, {"status": "authorised"})).status_code == 200
    assert (await saga.outcome(order_id)).status == "shipped"
    order_stream, payment_stream = f"order-{order_id}", f"payment-{payment_id_for(order_id)}"

    # The event store's file and its write-ahead log, and the read model's.
    files = []
    for url in (saga.event_store_url, saga.container.settings.read_store_url):
        db = sqlite_path(url)
        files += [db, db.with_name(db.name + "-wal")]
    stored = {path.name: path.read_bytes() for path in files if path.exists()}
    assert {name: data.count(b"tok_") for name, data in stored.items()} == dict.fromkeys(stored, 0)
    assert b"pm_sbx_pending_" in stored["events.db"] + stored.get("events.db-wal", b"")

    # `orderstream events read` of both streams.
    for stream in (order_stream, payment_stream):
        out = await cli("events", "read", stream, "--data-dir", str(tmp_path))
        assert out.count("tok_") == 0
        assert "pm_sbx_pending_" in out

    # The saga's Temporal history: input, activity arguments and results, memo. The
    # payloads are base64 in the history's JSON: decoded, as the Web UI shows them.
    history = (await saga.handle(order_id).fetch_history()).to_json_dict()
    payloads = "\n".join(decoded_payloads(history))
    assert "tok_" not in payloads
    assert "tok_" not in json.dumps(history)
    assert "pm_sbx_pending_" in payloads  # the input is there, readable, with the reference only

    # Logs and metrics.
    assert "tok_" not in caplog.text
    metrics = await saga.http.get("/metrics")
    assert metrics.status_code == 200
    assert "tok_" not in metrics.text


def decoded_payloads(node: Any) -> list[str]:
    """Every payload's ``data`` in a history (JSON form: base64), decoded."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and isinstance(node.get("data"), str):
            found.append(base64.b64decode(node["data"]).decode("utf-8", "replace"))
        for value in node.values():
            found += decoded_payloads(value)
    elif isinstance(node, list):
        for value in node:
            found += decoded_payloads(value)
    return found


async def cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orderstream.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_no_usable_secret_is_a_503_not_a_500(tmp_path: Path) -> None:
    """No ORDERSTREAM_WEBHOOK_SECRET and a data dir where none can be created. (Auth is
    off: the local issuer's key could not be created there either, and the webhook does
    not use bearer tokens anyway.)"""
    (tmp_path / "file").write_text("")
    settings = Settings(
        auth_enabled=False,
        data_dir=tmp_path / "file" / "data",
        event_store_url=f"sqlite:///{tmp_path}/events.db",
        read_store_url=f"sqlite:///{tmp_path}/read.db",
    )
    container = await build(settings)
    try:
        transport = httpx.ASGITransport(app=cast("Any", create_app(container)))
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream.test") as http:
            raw = b'{"payment_id":"p1","event_id":"evt_1","status":"authorised"}'
            signature = webhook_signature.sign(raw, ["some-secret-we-cannot-have"], int(time.time()))
            response = await http.post(
                "/payments/p1/webhook",
                content=raw,
                headers={"content-type": "application/json", webhook_signature.HEADER: signature},
            )
        assert response.status_code == 503, response.text
        assert "file" not in response.text  # no path in the answer
        assert await container.event_store.head_position() is None
    finally:
        await container.close()
