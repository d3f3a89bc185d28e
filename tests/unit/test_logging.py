"""orderstream.logging_setup: one line per record, JSON or console, with the ids an
on-call engineer correlates by, and the libraries' noise turned down.

The whole-order-flow check (no payment token, no bearer token in a real
``serve``'s log) is in tests/unit/test_logging_flow.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from temporalio.exceptions import ApplicationError

from orderstream import logging_setup
from orderstream.application.commands import CommandContext
from orderstream.domain.common import Money
from orderstream.eventstore.base import EventMetadata, RecordedEvent
from orderstream.sagas import runtime as temporal
from tests.api.helpers import order_body, register_product
from tests.api.test_cli import _env
from tests.conftest import MakeClient

ROOT = Path(__file__).resolve().parents[2]


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@contextlib.contextmanager
def configured(level: int, fmt: logging_setup.LogFormat, stream: io.StringIO) -> Iterator[None]:
    """Logging configured as the CLI does it, into ``stream``; as it was afterwards."""
    root = logging.getLogger()
    root_level, handlers = root.level, list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in logging_setup.THIRD_PARTY_LEVELS}
    logging_setup.configure(level, fmt=fmt, stream=stream)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture
def captured() -> Iterator[Captured]:
    """In JSON at DEBUG, into a buffer."""
    out = Captured()
    with configured(logging.DEBUG, "json", out.stream):
        yield out


def test_a_record_is_one_json_line_with_the_bound_and_the_extra_fields(captured: Captured) -> None:
    log = logging.getLogger("orderstream.test")
    with logging_setup.bound(correlation_id="corr-1", causation_id=None):
        log.info("placed %s", "order-1", extra={"stream": "order-1", "position": 42, "card": "x"})
    log.info("outside")

    inside, outside = captured.records()
    assert inside["message"] == "placed order-1"
    assert (inside["level"], inside["logger"]) == ("info", "orderstream.test")
    assert (inside["correlation_id"], inside["stream"], inside["position"]) == ("corr-1", "order-1", 42)
    assert "causation_id" not in inside  # None is left out
    assert "card" not in inside  # only the context keys are taken from extra=
    assert datetime.fromisoformat(inside["timestamp"]).utcoffset() is not None
    assert "correlation_id" not in outside


def test_a_nested_binding_restores_the_outer_one(captured: Captured) -> None:
    log = logging.getLogger("orderstream.test")
    with logging_setup.bound(stream="order-1", position=1):
        with logging_setup.bound(stream="product-A"):
            log.info("inner")
        log.info("outer")

    inner, outer = captured.records()
    assert (inner["stream"], inner["position"]) == ("product-A", 1)
    assert (outer["stream"], outer["position"]) == ("order-1", 1)


def test_binding_a_value_already_bound_changes_nothing_and_a_new_one_is_restored(
    captured: Captured,
) -> None:
    """``bound`` leaves a key bound to the same value alone (the command handler
    inside a request) and still binds and restores one bound to another value."""
    log = logging.getLogger("orderstream.test")
    with logging_setup.bound(correlation_id="corr-1"):
        with logging_setup.bound(correlation_id="corr-1", stream="order-1"):
            log.info("same")
        with logging_setup.bound(correlation_id="corr-2", causation_id="cause-2"):
            log.info("other")
        log.info("outer")
    log.info("outside")

    same, other, outer, outside = captured.records()
    assert (same["correlation_id"], same["stream"]) == ("corr-1", "order-1")
    assert (other["correlation_id"], other["causation_id"]) == ("corr-2", "cause-2")
    assert outer["correlation_id"] == "corr-1"
    assert "stream" not in outer
    assert "causation_id" not in outer
    assert not {"correlation_id", "stream", "causation_id"} & outside.keys()


def test_an_exception_is_a_structured_traceback_on_the_same_line(captured: Captured) -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("orderstream.test").exception("it failed")

    (record,) = captured.records()
    assert record["level"] == "error"
    assert record["exception"][0]["exc_type"] == "ValueError"
    assert record["exception"][0]["exc_value"] == "broken"


def test_event_context_binds_what_a_consumer_knows(captured: Captured) -> None:
    event = RecordedEvent(
        id=uuid.uuid4(),
        stream="order-7",
        revision=3,
        position=99,
        type="OrderPlaced",
        data=b"{}",
        metadata_json=EventMetadata(correlation_id="corr-7", causation_id="cause-7", actor="alice").to_json(),
        recorded_at=datetime.now(UTC),
        schema_version=3,
    )
    with logging_setup.event_context(event):
        logging.getLogger("orderstream.saga").warning("cannot be handled")

    (record,) = captured.records()
    assert {k: record[k] for k in ("stream", "position", "event_type", "correlation_id", "causation_id")} == {
        "stream": "order-7",
        "position": 99,
        "event_type": "OrderPlaced",
        "correlation_id": "corr-7",
        "causation_id": "cause-7",
    }
    assert "actor" not in record


def test_third_party_chatter_is_turned_down_at_info() -> None:
    out = io.StringIO()
    with configured(logging.INFO, "json", out):
        logging.getLogger("elastic_transport.transport").info("POST http://es:9200/_bulk [status:200]")
        logging.getLogger("temporalio.worker._worker").info("Beginning worker shutdown")
        logging.getLogger("temporalio.activity").info("activity says")
        logging.getLogger("elastic_transport.node_pool").warning("node is dead")
    messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert messages == ["activity says", "node is dead"]


def test_console_format_is_text_for_a_person() -> None:
    out = io.StringIO()
    with configured(logging.INFO, "console", out), logging_setup.bound(stream="order-1"):
        logging.getLogger("orderstream").info("hello")
    (line,) = out.getvalue().splitlines()
    assert "hello" in line
    assert "stream=order-1" in line
    assert "\x1b[" not in line  # no colours into something that is not a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_the_format_comes_from_the_environment_or_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(logging_setup.ENV_FORMAT, raising=False)
    assert logging_setup.default_format(Tty()) == "console"
    assert logging_setup.default_format(io.StringIO()) == "json"
    monkeypatch.setenv(logging_setup.ENV_FORMAT, "JSON")
    assert logging_setup.default_format(Tty()) == "json"
    monkeypatch.setenv(logging_setup.ENV_FORMAT, "console")
    assert logging_setup.default_format(io.StringIO()) == "console"
    monkeypatch.setenv(logging_setup.ENV_FORMAT, "xml")
    with pytest.raises(ValueError, match="ORDERSTREAM_LOG_FORMAT"):
        logging_setup.default_format(io.StringIO())


def test_a_bad_log_format_is_a_usage_error_of_the_cli(tmp_path: Path) -> None:
    env = {**_env(), logging_setup.ENV_FORMAT: "xml"}
    result = subprocess.run(
        [sys.executable, "-m", "orderstream.cli", "projections", "status", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "ORDERSTREAM_LOG_FORMAT" in result.stderr


async def test_what_a_command_logs_carries_the_request_correlation_id_and_the_stream(
    captured: Captured, make_client: MakeClient
) -> None:
    async with make_client() as (client, _container):
        await register_product(client, "SKU-1")
        placed = await client.post(
            "/orders", json=order_body(("SKU-1", 1)), headers={"X-Correlation-ID": "corr-logs-1"}
        )
        assert placed.status_code == 201, placed.text
        order_id = placed.json()["id"]

    command_lines = [
        r
        for r in captured.records()
        if r["logger"] == "orderstream.commands" and r.get("stream") == f"order-{order_id}"
    ]
    assert command_lines, captured.stream.getvalue()[-2000:]
    assert all(r["correlation_id"] == "corr-logs-1" for r in command_lines)
    assert any(r["message"].startswith("PlaceOrder: ok") for r in command_lines)
    stock_lines = [r for r in captured.records() if r["message"].startswith("AddStock: ok")]
    assert [r.get("stream") for r in stock_lines] == ["product-SKU-1"]  # a batched command too


async def test_a_command_outside_a_request_logs_its_own_correlation_and_causation_ids(
    captured: Captured, make_client: MakeClient
) -> None:
    """A saga activity's command has no request around it: the metered handler binds
    the context's ids itself."""
    async with make_client() as (_client, container):
        context = CommandContext(actor="saga", correlation_id="corr-saga", causation_id="cause-saga")
        price = Money(amount=100, currency="EUR")
        await container.use_cases.register_product("SKU-9", "Mug", price, context)

    (line,) = [r for r in captured.records() if r["message"].startswith("RegisterProduct: ok")]
    assert (line["stream"], line["correlation_id"], line["causation_id"]) == (
        "product-SKU-9",
        "corr-saga",
        "cause-saga",
    )


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_traceback_shows_no_local_variables(fmt: logging_setup.LogFormat) -> None:
    """A request's frames hold its bearer token, headers and body: a logged traceback
    names the frames, never their locals (structlog's and rich's default shows them)."""

    def handle(authorization: str) -> None:
        token = authorization.removeprefix("Bearer ")
        raise ValueError(f"bad claims in a token of {len(token)} characters")

    secret = uuid.uuid4().hex  # not in the source lines a traceback quotes
    out = io.StringIO()
    with configured(logging.INFO, fmt, out):
        try:
            handle(f"Bearer eyJ{secret}")
        except ValueError:
            logging.getLogger("orderstream.api").exception("unhandled")
    logged = out.getvalue()
    assert "bad claims in a token of" in logged
    assert "handle" in logged  # the frame is there
    assert secret not in logged


def test_a_saga_steps_business_refusal_is_one_line_without_its_traceback(captured: Captured) -> None:
    """The SDK logs each failed activity with its traceback; a non-retryable
    ApplicationError (out of stock) is the step's answer: one line. A retryable
    failure keeps its traceback."""
    activity_log = logging.getLogger("temporalio.activity")
    for error in (
        ApplicationError(
            "insufficient stock of TEA: 100% gone", type="InsufficientStock", non_retryable=True
        ),
        ApplicationError("gateway timed out", type="Unavailable"),
    ):
        try:
            raise error
        except ApplicationError:
            activity_log.warning(
                "Completing activity as failed (%s)", {"activity_type": "reserve"}, exc_info=True
            )
    refusal, retryable = [r for r in captured.records() if r["logger"] == "temporalio.activity"]
    assert "exception" not in refusal
    assert refusal["message"].endswith(": InsufficientStock: insufficient stock of TEA: 100% gone")
    assert "'activity_type': 'reserve'" in refusal["message"]
    assert retryable["exception"][0]["exc_value"].endswith("gateway timed out")  # the traceback is kept
    assert retryable["exception"][0]["frames"]


class _DownThenUp(grpc.GenericRpcHandler):
    """A stand-in Temporal frontend: answers the client's connect (``GetSystemInfo``),
    then refuses every other call ``failures`` times with UNAVAILABLE (what an outage
    looks like to the SDK's core, which retries), then answers (empty responses)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(details.method).rsplit("/", 1)[-1]

        def answer(_request: bytes, context: grpc.ServicerContext) -> bytes:
            with self.lock:
                down = method != "GetSystemInfo" and self.failures > 0
                self.failures -= down
            if down:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the stand-in is down")
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)


@contextlib.contextmanager
def stand_in_frontend(failures: int) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(4), handlers=[_DownThenUp(failures)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


async def test_what_temporals_core_logs_is_a_json_record(
    captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's Rust core wrote its warnings to stderr itself, in coloured text
    (``WARN temporalio_client::retry: gRPC call ... retried``): lines that broke the
    JSON log. On the runtime that ``connect`` uses they are records like any other."""
    monkeypatch.setattr(temporal.CORE_RETRIES, "_last", {})  # another test's retries are not this one's
    with stand_in_frontend(failures=5) as address:
        client = await temporal.connect(address)
        await client.count_workflows()  # retried 5 times: the core warns at the 5th (half of 10)

        async def core_record() -> dict[str, Any]:
            while True:  # the runtime forwards the core's lines every few milliseconds
                found = [r for r in captured.records() if r["logger"] == temporal.CORE_LOGGER]
                if found:
                    return found[0]
                await asyncio.sleep(0.02)

        record = await asyncio.wait_for(core_record(), 10)
    assert record["level"] == "warning"
    assert record["message"] == "gRPC call count_workflow_executions retried 5 times"
    assert record["core_target"] == "temporalio_client::retry"
    assert "the stand-in is down" in record["core_fields"]["error"]
    assert "\x1b[" not in captured.stream.getvalue()


def test_the_cores_retry_lines_come_once_a_minute_per_call() -> None:
    """During an outage every poll and call in flight retries and the core says so at
    each attempt (976 lines in a fault run): one line per call per interval, with the
    count of those left out since."""
    now = [0.0]
    throttle = temporal.CoreRetryThrottle(60.0, clock=lambda: now[0])

    def passes(message: str, target: str = "temporalio_client::retry") -> bool:
        record = logging.LogRecord(temporal.CORE_LOGGER, logging.WARNING, "(sdk-core)", 0, message, (), None)
        record.temporal_log = SimpleNamespace(target=target)
        passed = throttle.filter(record)
        seen.append(record.getMessage())
        return passed

    seen: list[str] = []
    assert passes("gRPC call poll_workflow_task_queue retried 6 times")
    assert not passes("gRPC call poll_workflow_task_queue retried 7 times")
    assert not passes("gRPC call poll_workflow_task_queue retried 6 times")
    assert passes("gRPC call start_workflow_execution retried 5 times")  # another call: its own line
    assert passes("Query not found", target="temporalio_sdk_core::worker::workflow")  # not a retry
    now[0] = 61.0
    assert passes("gRPC call poll_workflow_task_queue retried 16 times")
    assert seen[-1] == "gRPC call poll_workflow_task_queue retried 16 times (2 more such lines left out)"
    assert not passes("gRPC call poll_workflow_task_queue retried 17 times")
