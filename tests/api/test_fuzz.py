"""Schema-based fuzzing: every documented operation of a real ``orderstream serve``
process, driven by its own OpenAPI document (schemathesis).

For each operation, schemathesis generates requests that match the schema
(positive) and requests that break it (negative), and checks every answer:

- no server error: no 5xx at all, except the documented 503 of a query whose
  ``min_position`` the read model has not reached (the server runs with a short
  consistency timeout so those answer fast);
- the status code, the ``Content-Type``, the body and the headers are the
  documented ones; a request that breaks the schema gets a 4xx; a request that
  matches it is never refused as malformed (a business rule may refuse it); the
  run sends a valid admin token (an operation that ignores a missing or bad one
  fails ``ignored_auth``);
- every error is an RFC 9457 problem (``application/problem+json`` with ``type``,
  ``title``, ``status``, ``detail``);
- a write that answers with an error appends nothing to the event store.

The saga routes (``/payments/...``, ``/orders/{order_id}/fulfilment``) need
Temporal and are left out. The run is bounded and derandomized, so CI sees the
same requests every time. For a broader exploratory run, start a server by hand
(``TOKEN=$(orderstream tokens issue --data-dir DIR --role admin | tail -n 1)``) and run the
``schemathesis`` CLI, e.g.::

    schemathesis run http://127.0.0.1:PORT/schema/openapi.json -H "Authorization: Bearer $TOKEN" \\
        --checks all --exclude-path-regex '^/payments|/fulfilment$' -n 300 --workers 1
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.generation.meta import negated_parameters

from orderstream.api.schemas import ORDER_ID_PATTERN
from tests.api.helpers import order_body
from tests.tokens import admin_headers

ROOT = Path(__file__).resolve().parents[2]
PROBLEM_JSON = "application/problem+json"
SEEDED_SKUS = ("SKU-RED-42", "0")  # the schema's example SKU, and the simplest generated one
SAGA_ROUTES = r"^/payments/|/fulfilment$"
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


@dataclass
class Server:
    url: str
    order_ids: list[str]
    log: Path
    auth: dict[str, str]
    """An admin's ``Authorization`` header (a token of the server's local issuer)."""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERSTREAM_", "TEMPORAL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["ORDERSTREAM_CONSISTENCY_TIMEOUT"] = "0.1"
    return env


def _seed(url: str, auth: dict[str, str]) -> list[str]:
    """Products with stock (so generated orders can succeed) and a few orders
    (so the order routes reach existing orders, not only 404s)."""
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
        for sku in SEEDED_SKUS:
            created = client.post(
                "/products", json={"sku": sku, "name": "Mug", "price": {"amount": 1250, "currency": "EUR"}}
            )
            assert created.status_code == 201, created.text
            stocked = client.post(f"/products/{sku}/stock", json={"quantity": 1_000_000})
            assert stocked.status_code == 200, stocked.text
        order_ids = []
        for i in range(3):
            placed = client.post("/orders", json=order_body(("SKU-RED-42", 1), customer_id=f"cust-{i}"))
            assert placed.status_code == 201, placed.text
            order_ids.append(placed.json()["id"])
        return order_ids


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("fuzz")
    log = base / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "orderstream.cli", "serve", "--no-sagas", "--port", "0"),
                *("--data-dir", str(base / "data"), "--log-level", "warning"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        assert url is not None, f"orderstream serve did not start:\n{log.read_text()[-3000:]}"
        auth = admin_headers(base / "data")
        yield Server(url=url, order_ids=_seed(url, auth), log=log, auth=auth)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/schema/openapi.json")
    order_id = re.compile(ORDER_ID_PATTERN)

    @schema.hook
    def map_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        # Point most valid order ids at the seeded orders; leave invalid ones (the
        # negative cases) alone, and one in four at random ids (404s).
        value = (path_parameters or {}).get("order_id")
        if isinstance(value, str) and order_id.fullmatch(value) and len(value) % 4:
            path_parameters = {
                **(path_parameters or {}),
                "order_id": fuzz_server.order_ids[len(value) % 4 - 1],
            }
        return path_parameters

    return schema


# ---------------------------------------------------------------------------- checks


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except the documented 503 of a query that asked for a ``min_position``
    the read model has not reached within the consistency timeout."""
    if response.status_code < 500:
        return None
    body = _json(response)
    consistency_timeout = (
        response.status_code == 503
        and "min_position" in (case.query or {})
        and body.get("type") == "urn:orderstream:problem:not-yet-consistent"
        and response.headers.get("retry-after")
    )
    if not consistency_timeout:
        raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")
    return None


def problem_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error is an RFC 9457 problem."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, (
        f"{response.status_code} answered with Content-Type {content_type!r}"
    )
    body = _json(response)
    for key in ("type", "title", "status", "detail"):
        assert key in body, f"the problem has no {key!r}: {response.text[:500]}"
    assert body["status"] == response.status_code, response.text[:500]
    return None


MALFORMED = {
    "malformed-json",
    "invalid-body",
    "invalid-parameter",
    "invalid-header",
    "unsupported-media-type",
}


def valid_input_is_not_called_malformed(ctx: Any, response: Any, case: Any) -> bool | None:
    """A request that matches the schema may be refused for a business reason (an
    unknown SKU, a stale If-Match, an opaque cursor from nowhere), never as malformed:
    that would mean the document promises more than the server accepts."""
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return None
    kind = str(_json(response).get("type", "")).removeprefix("urn:orderstream:problem:")
    assert kind not in MALFORMED, f"a schema-valid request was refused: {response.text[:500]}"
    return None


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except Exception:
        return {}
    return body if isinstance(body, dict) else {}


CHECKS = [
    no_server_error,
    problem_details,
    valid_input_is_not_called_malformed,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.missing_required_header,
    checks.ignored_auth,
]

# Every operation of the contract except the saga routes; test_every_operation_is_fuzzed
# keeps this list in step with the OpenAPI document.
OPERATIONS = [
    "POST /products",
    "GET /products",
    "GET /products/{sku}",
    "POST /products/{sku}/stock",
    "POST /orders",
    "GET /orders",
    "GET /orders/{order_id}",
    "PATCH /orders/{order_id}",
    "DELETE /orders/{order_id}",
    "GET /orders/{order_id}/events",
    "GET /orders/{order_id}/state",
    "GET /health",
    "GET /ready",
    "GET /metrics",
]
FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same requests on every run
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    documented = {
        f"{result.ok().method.upper()} {result.ok().path}" for result in api_schema.get_all_operations()
    }
    assert {op for op in documented if not re.search(SAGA_ROUTES, op.split(" ", 1)[1])} == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_answers_as_documented(
    label: str, mode: GenerationMode, api_schema: Any, fuzz_server: Server, session: requests.Session
) -> None:
    """Positive: requests that match the schema; negative: requests that break it."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    if mode is GenerationMode.NEGATIVE and not (list(operation.iter_parameters()) or operation.body):
        pytest.skip("no input to break")
    write = method in WRITE_METHODS

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        before = _head(session, fuzz_server.url) if write else None
        response = case.call_and_validate(
            session=session, headers=_auth_for(case, fuzz_server), checks=CHECKS
        )
        if write and response.status_code >= 400:
            after = _head(session, fuzz_server.url)
            assert after == before, (
                f"{case.method} {case.formatted_path} answered {response.status_code} "
                f"but the event store moved from {before} to {after}"
            )

    try:
        run()
    except BaseException:
        print(f"server log (tail):\n{fuzz_server.log.read_text()[-3000:]}")
        raise


def _auth_for(case: Any, server: Server) -> dict[str, str]:
    """The admin token, unless this negative case breaks the ``Authorization`` header
    itself (the documented bearer requirement): then the server must refuse it (401)."""
    if any(name.lower() == "authorization" for name, _location in negated_parameters(case.meta)):
        return {}
    return server.auth


def _head(session: requests.Session, url: str) -> int | None:
    ready = session.get(f"{url}/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    head: int | None = ready.json()["head_position"]
    return head


def test_options_lists_every_documented_method(api_schema: Any, fuzz_server: Server) -> None:
    """``OPTIONS`` answers with every method the path documents (Litestar 2 listed
    only the first handler's: litestar-org/litestar#4169)."""
    documented: dict[str, set[str]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        documented.setdefault(operation.path, set()).add(operation.method.upper())
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        for path, methods in documented.items():
            concrete = re.sub(r"\{[^}]+\}", "x1", path)
            response = client.options(concrete)
            assert response.status_code == 204, (path, response.text)
            allowed = {m.strip() for m in response.headers["allow"].split(",")}
            assert allowed == methods | {"OPTIONS"}, path


def test_a_body_that_is_not_json_is_a_415(api_schema: Any, fuzz_server: Server) -> None:
    """Every operation with a JSON body refuses another media type, as documented."""
    with httpx.Client(base_url=fuzz_server.url, headers=fuzz_server.auth, timeout=30) as client:
        head = client.get("/ready").json()["head_position"]
        probed = 0
        for result in api_schema.get_all_operations():
            operation = result.ok()
            if not operation.body:
                continue
            assert "415" in operation.definition.raw["responses"], operation.label
            if re.search(SAGA_ROUTES, operation.path):
                continue
            url = re.sub(r"\{[^}]+\}", "SKU-RED-42", operation.path)
            if "{order_id}" in operation.path:
                url = operation.path.replace("{order_id}", fuzz_server.order_ids[0])
            for content_type in ("text/plain", "application/x-www-form-urlencoded"):
                response = client.request(
                    operation.method.upper(),
                    url,
                    content=b'{"quantity": 1}',
                    headers={"Content-Type": content_type},
                )
                assert response.status_code == 415, (operation.label, response.text)
                assert response.headers["content-type"] == PROBLEM_JSON
                assert response.json()["type"] == "urn:orderstream:problem:unsupported-media-type"
                probed += 1
        assert probed == 8  # POST /products, POST .../stock, POST /orders, PATCH /orders/{id}; 2 types each
        assert client.get("/ready").json()["head_position"] == head
