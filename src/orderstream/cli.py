"""``orderstream``: run the service and operate it.

    orderstream serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR]   API + projections (+ sagas)
    orderstream api                                                        the API only
    orderstream project [--metrics-port 9100]                              the projection runners only
    orderstream worker [--metrics-port 9100]                               the saga services only
    orderstream projections status | rebuild NAME | parked NAME | replay-parked NAME
                            | skip NAME POSITION --reason WHY | skipped NAME
    orderstream events read STREAM | tail
    orderstream webhook sign --body FILE|-                                 the payment provider's signature

``project`` and ``worker`` serve no HTTP API; given ``--metrics-port`` (env
``ORDERSTREAM_METRICS_PORT``) they answer ``GET /metrics`` there, on
``--metrics-host`` (``127.0.0.1``): see :mod:`orderstream.api.metrics_port`.

``serve`` and ``api`` take ``--workers N`` (env ``ORDERSTREAM_API_WORKERS``): with
N > 1 the first process serves no HTTP; it holds the port and starts N
``orderstream api`` worker processes that listen on it with ``SO_REUSEPORT``
(the kernel spreads connections over them). Each worker is a whole API process
with its own stores and group-commit writer on the shared SQLite files.
Projections and sagas stay in the first process, so under ``serve`` requests
never queue behind them. See :class:`ApiWorkerProcess`.

The HTTP server is uvicorn with httptools on a uvloop event loop, chosen by
measurement (issue 7: half the server CPU per request of h11 on asyncio on the
bare route; granian used the same CPU per request as this choice, and runs
beside our other services in one event loop only in an embedded mode it marks
experimental).

Every command takes the store options (``--data-dir``, ``--event-store``,
``--read-store``, ``--temporal-address``), which override the environment
variables of :mod:`orderstream.config`.

Shutdown (SIGINT / SIGTERM): the HTTP server stops accepting connections and
finishes the requests in flight, then the projection runners and other
services stop, then the event store is closed, which writes every append it
has acknowledged. A second signal does not cut this short. API workers get
SIGTERM at the same time and drain the same way; the first process waits for
them before it closes its own stores and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import getpass
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
import uvloop

from orderstream import logging_setup, tracing
from orderstream.application import webhook_signature
from orderstream.application.group_status import GroupStatus
from orderstream.application.queries import event_data
from orderstream.auth.local_issuer import (
    DEFAULT_TTL,
    MAX_TTL,
    ensure_signing_key,
    how_to_get_a_token,
    issue_token,
)
from orderstream.auth.principal import Role
from orderstream.bootstrap import build
from orderstream.config import MAX_API_WORKERS, ConfigError, ConnectionLimits, Settings
from orderstream.container import Container
from orderstream.eventstore.base import (
    EventFilter,
    EventStoreError,
    EventStoreUnavailable,
    ParkedEventNotFound,
    RecordedEvent,
    SkippedEvent,
)
from orderstream.metrics import metrics_shared_across_processes
from orderstream.readstore.base import ReadStoreUnavailable
from orderstream.sagas.dev_server import DevServerExited
from orderstream.sagas.fulfilment.saga import FulfilmentSaga
from orderstream.sagas.fulfilment.settings import FulfilmentSettings
from orderstream.sagas.fulfilment.trigger import GROUP as SAGA_GROUP
from orderstream.services import BackgroundService, run_child_process, run_services

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("orderstream")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- plumbing


def store_options(fn: F) -> F:
    """The options every command shares; each overrides its environment variable."""
    options = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Data directory for the embedded stores [env ORDERSTREAM_DATA_DIR; ./data].",
        ),
        click.option("--event-store", "event_store_url", default=None, help="[env ORDERSTREAM_EVENT_STORE]"),
        click.option("--read-store", "read_store_url", default=None, help="[env ORDERSTREAM_READ_STORE]"),
        click.option("--temporal-address", default=None, help="[env TEMPORAL_ADDRESS]"),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def settings_from(options: dict[str, Any]) -> Settings:
    """The settings of the core; call :func:`saga_settings_from` first where the
    saga's (``--temporal-address``) matter."""
    options.pop("temporal_address", None)
    level = str(options.pop("log_level", "info")).upper()
    try:
        logging_setup.configure(level)
    except ValueError as exc:  # a bad ORDERSTREAM_LOG_FORMAT
        raise click.UsageError(str(exc)) from exc
    try:
        tracing.configure()  # OTEL_TRACES_EXPORTER etc.; off unless set
    except tracing.TracingConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        return Settings.from_env(**options)
    except (ConfigError, TypeError) as exc:
        raise click.UsageError(str(exc)) from exc


def saga_settings_from(options: dict[str, Any], *, serve: bool = False) -> FulfilmentSettings:
    """The fulfilment saga's settings: the environment and ``--temporal-address``.
    ``serve`` runs the saga worker in a process of its own where there are 2 cores
    or more, unless ``ORDERSTREAM_SAGA_WORKER_PROCESSES`` says otherwise: measured
    faster on 2 cores (docs/sagas.md, Throughput)."""
    processes = 1 if serve and (os.cpu_count() or 1) >= 2 else 0
    try:
        return FulfilmentSettings.from_env(
            os.environ, temporal_address=options.pop("temporal_address", None), worker_processes=processes
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


OPERATIONAL_ERRORS: tuple[type[Exception], ...] = (
    EventStoreError,
    ReadStoreUnavailable,
    ConfigError,
    DevServerExited,
    OSError,
)
"""What a command can meet outside the code (a store down or full, a port in use, a
data dir it cannot write, a wrong setting): one line on stderr and exit status 1,
the traceback only at ``--log-level debug``."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a uvloop event loop (measured faster than asyncio's for the
    API's socket and thread hand-off work, issue 7); an operational error ends it as
    one line (:data:`OPERATIONAL_ERRORS`)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(coro)
        except OPERATIONAL_ERRORS as exc:
            log.debug("stopped by %s", type(exc).__name__, exc_info=True)
            raise click.ClickException(str(exc) or type(exc).__name__) from exc


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT / SIGTERM set ``stop`` (graceful shutdown) instead of killing the process."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, stop, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("%s: shutting down gracefully", sig.name)
    stop.set()


@contextlib.asynccontextmanager
async def opened(settings: Settings, saga: FulfilmentSaga | None = None) -> AsyncIterator[Container]:
    container = await build(settings, saga=saga)
    try:
        yield container
    finally:
        await container.close()


def _runner(container: Container, name: str) -> Any:
    runner = container.runners.get(name)
    if runner is None:
        known = ", ".join(sorted(container.runners))
        raise click.BadParameter(f"no projection {name!r} (known: {known})", param_hint="NAME")
    return runner


def _groups(container: Container) -> dict[str, str]:
    """Every subscription group this service consumes, by the name an operator types:
    each projection (its name, e.g. ``orders``) and the saga trigger (its group name)."""
    return {**{name: r.group for name, r in container.runners.items()}, SAGA_GROUP: SAGA_GROUP}


def _group(container: Container, name: str) -> str:
    """The group NAME stands for: a projection's name, or any known group's own name."""
    known = _groups(container)
    if name in known:
        return known[name]
    if name in known.values():
        return name
    raise click.BadParameter(
        f"no projection or subscription group {name!r} (known: {', '.join(sorted(known))})", param_hint="NAME"
    )


def event_json(event: RecordedEvent) -> str:
    """One stored event as a JSON line, as the history route shows it: a card token
    that an old writer stored in clear is redacted."""
    data, metadata = event_data(event)
    return json.dumps(
        {
            "id": str(event.id),
            "stream": event.stream,
            "revision": event.revision,
            "position": event.position,
            "type": event.type,
            "schema_version": event.schema_version,
            "recorded_at": event.recorded_at.isoformat(),
            "data": data,
            "metadata": metadata,
        },
        ensure_ascii=False,
    )


# ------------------------------------------------------------------------------ serve


def freeze_start_up_heap() -> None:
    """Once serving: collect, then move every object made at start-up (modules, routes,
    schemas: ~140,000) out of the garbage collector's sight (``gc.freeze``). A full
    collection otherwise scans them all, holding the GIL: under a list load that paused
    every request in flight for 160-300 ms a few times a minute (bench.queries --cpu,
    docs/read-models.md)."""
    gc.collect()
    gc.freeze()


class EmbeddedServer:
    """A uvicorn server run inside our event loop, beside the other services.

    uvicorn's own signal capture is switched off (it would re-raise the signal
    after serving, killing the process before the event store is closed); the
    signals set our ``stop`` event, which tells the server to exit. Given
    ``sock``, it serves that already bound socket (the ``--workers`` case).
    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        access_log: bool,
        limits: ConnectionLimits,
        sock: socket.socket | None = None,
    ) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Generator[None, None, None]:
                yield

        self.config = http_server_config(app, host, port, access_log=access_log, limits=limits)
        self.server = _Server(self.config)
        self.sock = sock

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def bound_port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    async def serve(self) -> None:
        await self.server.serve(sockets=None if self.sock is None else [self.sock])

    def exit(self) -> None:
        self.server.should_exit = True


def http_server_config(
    app: Any, host: str, port: int, *, access_log: bool, limits: ConnectionLimits
) -> uvicorn.Config:
    """Every option of the HTTP server, in one place.

    uvicorn with httptools (see the module docstring for why) and, against clients
    that hold connections without finishing requests (issue 12), its keep-alive
    timeout plus :mod:`orderstream.api.connections`' protocol, which adds the
    header timeout, the send timeout and the connection cap that uvicorn lacks; the
    body timeout is the application's (``strict_body``). uvicorn's own
    ``limit_concurrency`` is not used: it answers 503 to every new request once that
    many connections are open, idle ones included, which is what an attacker with
    idle connections wants."""
    import uvicorn

    from orderstream.api.connections import guarded_protocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # a float works
        access_log=access_log,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


def listening_socket(host: str, port: int, *, what: str) -> socket.socket:
    """A socket of this process alone listening on ``host:port`` (0: a free port):
    no ``SO_REUSEPORT``, so a second process given the same port fails here, with a
    message that says which, instead of sharing its connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise click.ClickException(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def shared_port_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    """A socket bound with ``SO_REUSEPORT``: every API worker binds and listens on
    its own, on one port, and the kernel spreads new connections over the
    listening ones evenly (one socket shared by all would let whichever process
    wakes first accept a burst of keep-alive connections and keep them). The
    first process binds one without listening: it picks the port (port 0: a free
    one) and holds it, but is given no connections.

    ``SO_REUSEPORT`` would also let a second ``serve`` of the same user share the
    port and half the traffic (two services on two data dirs behind one address),
    so the first process checks first that nothing listens there: a plain
    listening socket, opened and closed, fails as :func:`listening_socket` does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not listen and port != 0:
        listening_socket(host, port, what="API").close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class ApiWorkerProcess:
    """One API worker process: ``orderstream api --worker-of <our pid>`` on our port.

    A background service of the first process: it starts the worker, is ready
    when the worker says it listens, sends it SIGTERM when ``stop`` is set and
    waits for it to drain. A worker that exits on its own is started again
    (:func:`~orderstream.services.run_child_process`): the others answer
    meanwhile. The worker watches our pid and stops if we die without telling it.
    """

    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.ready = asyncio.Event()

    @property
    def name(self) -> str:
        return f"api-worker-{self.index}"

    async def run(self, stop: asyncio.Event) -> None:
        await run_child_process(self.name, self.argv, stop, env=self.env, on_line=self._line)

    def _line(self, line: str) -> None:
        """The worker's stdout into our log; its ``listening on`` line makes us ready."""
        if "listening on" in line:
            self.ready.set()
        log.info("%s: %s", self.name, line)


def worker_argv(
    settings: Settings, host: str, port: int, *, access_log: bool, temporal_address: str | None = None
) -> list[str]:
    """The command line of an API worker: our settings, our port, our pid, and the
    Temporal server we use (the dev server ``serve`` started, so that the workers'
    fulfilment route reaches the same server)."""
    argv = [sys.executable, "-m", "orderstream.cli", "api", "--host", host, "--port", str(port)]
    argv += ["--worker-of", str(os.getpid()), "--workers", "1"]
    argv += ["--data-dir", str(settings.data_dir), "--event-store", settings.event_store_url]
    argv += ["--read-store", settings.read_store_url]
    if temporal_address:
        argv += ["--temporal-address", temporal_address]
    argv += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    argv.append("--access-log" if access_log else "--no-access-log")
    if not settings.auth_enabled:
        argv.append("--no-auth")
    return argv


def worker_env(saga: FulfilmentSaga) -> dict[str, str]:
    """The environment of an API worker: ours, and the Web UI that our saga's status
    links point to (a worker given only the dev server's address could not know that
    its Web UI runs here too)."""
    env = dict(os.environ)
    if saga.web_ui_url is not None:
        env["ORDERSTREAM_TEMPORAL_UI_URL"] = saga.web_ui_url
    return env


class ParentWatch:
    """A worker's service: stop when the first process is gone (its pid is no
    longer our parent), so a killed first process leaves no worker behind."""

    name = "parent-watch"

    def __init__(self, parent: int) -> None:
        self.parent = parent

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if os.getppid() != self.parent:
                log.warning("the first process (%d) is gone; stopping", self.parent)
                stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def run_process(
    settings: Settings,
    saga_settings: FulfilmentSettings,
    *,
    host: str | None,
    port: int | None,
    projections: bool,
    sagas: bool,
    access_log: bool = False,
    workers: int = 1,
    worker_of: int | None = None,
    metrics_port: tuple[str, int] | None = None,
    announce: Callable[[str], None] = click.echo,
) -> None:
    """The one process shape behind ``serve``, ``api``, ``project`` and ``worker``.

    ``workers`` > 1: this process serves no HTTP itself; it holds the port and
    runs ``workers`` :class:`ApiWorkerProcess` on it (beside the projections and
    sagas, for ``serve``: requests then never queue behind them on one event
    loop). ``worker_of``: this process is such a worker of that pid.
    ``metrics_port``: answer ``GET /metrics`` on that address too
    (:mod:`orderstream.api.metrics_port`; for the processes with no API); bound first,
    so that a port in use stops the process before it starts anything.

    ``announce`` (stdout) is for the person who started it: where it listens (the
    ``listening on`` line an :class:`ApiWorkerProcess`'s parent and the tests wait
    for), how to get a token, and ``stopped``. The rest is logged.
    """
    several = worker_of is None and (workers > 1 or (sagas and saga_settings.worker_processes > 0))
    saga = FulfilmentSaga(saga_settings)
    stop = asyncio.Event()
    metrics_sock = None if metrics_port is None else listening_socket(*metrics_port, what="metrics port")
    with (
        contextlib.closing(metrics_sock) if metrics_sock is not None else contextlib.nullcontext(),
        stop_on_signals(stop),
        metrics_shared_across_processes(several),  # before our metrics are built
    ):
        async with opened(settings, saga) as container:
            services: list[BackgroundService] = []
            if projections:
                services += container.projection_services
            if sagas:
                try:
                    services += await saga.services(container)
                except DevServerExited as exc:  # e.g. its port is taken: say so, no traceback
                    raise click.ClickException(f"the Temporal dev server did not start: {exc}") from exc
            listen = (host, port) if host is not None and port is not None else None
            if listen is not None:
                prepare_auth(settings)
            sock = None
            api_workers: list[ApiWorkerProcess] = []
            if listen is not None and workers > 1:
                sock = shared_port_socket(*listen, listen=False)
                listen = (listen[0], int(sock.getsockname()[1]))
                argv = worker_argv(
                    settings, *listen, access_log=access_log, temporal_address=saga.temporal_address
                )
                env = worker_env(saga)
                api_workers = [ApiWorkerProcess(i, argv, env) for i in range(1, workers + 1)]
                services += api_workers
            elif listen is not None and worker_of is not None:
                sock = shared_port_socket(*listen, listen=True)
            elif listen is not None:
                sock = listening_socket(*listen, what="API")
            if worker_of is not None:
                services.append(ParentWatch(worker_of))
            services_task = asyncio.create_task(run_services(services, stop), name="orderstream-services")
            server: EmbeddedServer | None = None
            server_task: asyncio.Task[None] | None = None
            if listen is not None and not api_workers:
                from orderstream.api.app import create_app

                if not sagas:
                    await connect_api(saga)

                server = EmbeddedServer(
                    create_app(container),
                    *listen,
                    access_log=access_log,
                    limits=settings.connections,
                    sock=sock,
                )
                server_task = asyncio.create_task(server.serve(), name="orderstream-http")
                listen = (listen[0], await _started(server, server_task))
            metrics_server: EmbeddedServer | None = None
            metrics_task: asyncio.Task[None] | None = None
            if metrics_port is not None and metrics_sock is not None:
                from orderstream.api.metrics_port import MetricsApp

                metrics_server = EmbeddedServer(
                    MetricsApp.for_settings(container),
                    *metrics_port,
                    access_log=False,
                    limits=settings.connections,
                    sock=metrics_sock,
                )
                metrics_task = asyncio.create_task(metrics_server.serve(), name="orderstream-metrics")
                bound = await _started(metrics_server, metrics_task)
                announce(f"metrics on http://{_url_host(metrics_port[0])}:{bound}/metrics")
            if listen is not None:
                await _wait_for_workers(api_workers, services_task)
                freeze_start_up_heap()
                url = f"http://{listen[0]}:{listen[1]}"
                announce(
                    f"orderstream listening on {url}" + (f" ({workers} API workers)" if api_workers else "")
                )
                announce(f"API docs: {url}/schema  (OpenAPI: {url}/schema/openapi.json)")
                announce(how_to_get_a_token(settings))
                announce(webhook_signature.describe_secret(settings.webhook_secrets, settings.data_dir))
            # A record, not an ``announce``: every process (the API and saga worker processes
            # too) says it, and its stdout may share the log (a container's, a child's
            # inherited stdout) where a plain line breaks a JSON log.
            log.info("background services: %s", ", ".join(s.name for s in services) or "none")
            try:
                waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()), services_task}
                if server_task is not None:
                    waiters.add(server_task)
                if metrics_task is not None:
                    waiters.add(metrics_task)
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # 1. stop accepting, finish in-flight requests (API workers: SIGTERM, by step 2's stop)
                stop.set()
                if server is not None and server_task is not None:
                    server.exit()
                    with contextlib.suppress(Exception):
                        await server_task
                # 2. stop the runners and other services; wait for the API workers to drain
                await services_task
                if sock is not None:
                    sock.close()
                # 3. the metrics port, last: it answers while the services drain
                if metrics_server is not None and metrics_task is not None:
                    metrics_server.exit()
                    with contextlib.suppress(Exception):
                        await metrics_task
            # 4. ``opened`` closes the stores: the event store writes every acknowledged append
        announce("stopped")


def prepare_auth(settings: Settings) -> None:
    """Before serving: create the local issuer's key (first start; before any API
    worker starts), or say loudly that authentication is off."""
    if not settings.auth_enabled:
        log.warning("!" * 72)
        log.warning("AUTHENTICATION IS OFF (--no-auth / ORDERSTREAM_AUTH=off): anyone may do anything.")
        log.warning("Never run it like this where others can reach the port.")
        log.warning("!" * 72)
    elif settings.auth_issuer is None:
        ensure_signing_key(settings.data_dir)


async def connect_api(saga: FulfilmentSaga) -> None:
    """For a process that serves the API without running the sagas: connect the
    saga's status route to ``TEMPORAL_ADDRESS`` if set. Failing is logged, not
    fatal: the fulfilment route answers 503 until then."""
    try:
        await saga.connect_api()
    except Exception as exc:
        log.warning("sagas unavailable to the API (%s): GET /orders/{id}/fulfilment answers 503", exc)


async def _wait_for_workers(workers: list[ApiWorkerProcess], services: asyncio.Task[None]) -> None:
    """Until every API worker listens (so that "listening on" means all of them do)."""
    for worker in workers:
        ready = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait({ready, services}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise click.ClickException(f"{worker.name} stopped during startup")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _started(server: EmbeddedServer, task: asyncio.Task[None]) -> int:
    """Wait until the server listens; its port."""
    while not server.started:
        if task.done():
            with contextlib.suppress(SystemExit):  # uvicorn's, after it has logged why
                task.result()  # what stopped the server
            raise click.ClickException("the HTTP server stopped during startup (the log above says why)")
        await asyncio.sleep(0.02)
    return server.bound_port()


# ------------------------------------------------------------------------------- CLI


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orderstream")
def main() -> None:
    """orderstream: an event-sourced CQRS order service."""
    # What orderstream writes (the event store, the read model, Temporal's state, the
    # rate counts, secrets) holds customers' names and addresses: its user's alone.
    os.umask(0o077)


def _http_options(fn: F) -> F:
    fn = click.option(
        "--workers",
        type=click.IntRange(1, MAX_API_WORKERS),
        default=None,
        help="API worker processes on the port [env ORDERSTREAM_API_WORKERS; api: 1, serve: 2 on 2+ cores].",
    )(fn)
    fn = click.option(
        "--auth/--no-auth",
        "auth_enabled",
        default=None,
        help="--no-auth: no authentication at all, for experiments [env ORDERSTREAM_AUTH; on].",
    )(fn)
    fn = click.option("--access-log/--no-access-log", default=False, help="Log every request.")(fn)
    fn = click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)(fn)
    fn = click.option("--host", default="127.0.0.1", show_default=True)(fn)
    return fn


@main.command()
@_http_options
@click.option(
    "--sagas/--no-sagas",
    default=True,
    show_default=True,
    help="Run the saga services (Temporal worker and trigger) too.",
)
@store_options
def serve(host: str, port: int, access_log: bool, workers: int | None, sagas: bool, **options: Any) -> None:
    """The API, every projection runner and the saga services in one process
    (with --workers N, the API in N worker processes beside it)."""
    saga_settings = saga_settings_from(options, serve=True)
    settings = settings_from({**options, "api_workers": workers})
    run(
        run_process(
            settings,
            saga_settings,
            host=host,
            port=port,
            projections=True,
            sagas=sagas,
            access_log=access_log,
            workers=settings.workers_for(serve=True),
        )
    )


@main.command()
@_http_options
@click.option("--worker-of", type=int, default=None, hidden=True, help="Internal: an API worker of PID.")
@store_options
def api(
    host: str, port: int, access_log: bool, workers: int | None, worker_of: int | None, **options: Any
) -> None:
    """The API only (run the projections with `orderstream project`)."""
    saga_settings = saga_settings_from(options)
    settings = settings_from({**options, "api_workers": workers})
    run(
        run_process(
            settings,
            saga_settings,
            host=host,
            port=port,
            projections=False,
            sagas=False,
            access_log=access_log,
            workers=settings.workers_for(serve=False),
            worker_of=worker_of,
        )
    )


def _metrics_options(fn: F) -> F:
    """Where a process with no API answers ``GET /metrics`` (:mod:`orderstream.api.metrics_port`)."""
    fn = click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        default=None,
        help="Answer GET /metrics on this port (0: a free one) [env ORDERSTREAM_METRICS_PORT; none].",
    )(fn)
    fn = click.option(
        "--metrics-host",
        default=None,
        help="The metrics port's address; 0.0.0.0 in a container [env ORDERSTREAM_METRICS_HOST; 127.0.0.1].",
    )(fn)
    return fn


def metrics_address(settings: Settings, worker_of: int | None = None) -> tuple[str, int] | None:
    """The metrics port to open, if any: never in a process another one started (it
    inherits the variable, not the port: its values reach the first one's scrape
    through the shared directory)."""
    if settings.metrics_port is None or worker_of is not None:
        return None
    return settings.metrics_host, settings.metrics_port


@main.command()
@_metrics_options
@store_options
def project(**options: Any) -> None:
    """The projection runners only."""
    saga_settings = saga_settings_from(options)
    settings = settings_from(options)
    run(
        run_process(
            settings,
            saga_settings,
            host=None,
            port=None,
            projections=True,
            sagas=False,
            metrics_port=metrics_address(settings),
        )
    )


@main.command()
@click.option("--worker-of", type=int, default=None, hidden=True, help="Internal: a saga worker of PID.")
@_metrics_options
@store_options
def worker(worker_of: int | None, **options: Any) -> None:
    """The saga services only (Temporal worker and saga trigger)."""
    saga_settings = saga_settings_from(options)
    settings = settings_from(options)
    run(
        run_process(
            settings,
            saga_settings,
            host=None,
            port=None,
            projections=False,
            sagas=True,
            worker_of=worker_of,
            metrics_port=metrics_address(settings, worker_of),
        )
    )


# ------------------------------------------------------------------------ projections


@main.group()
def projections() -> None:
    """Inspect and operate the read-model projections."""


@projections.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@store_options
def projections_status(as_json: bool, **options: Any) -> None:
    """Checkpoint, lag and parked events of every projection and of the saga trigger's group."""
    settings = settings_from(options)

    async def go() -> list[GroupStatus]:
        async with opened(settings) as container:
            statuses = [GroupStatus.of_projection(await r.status()) for r in container.runners.values()]
            saga = await GroupStatus.of_group(container.event_store, SAGA_GROUP)
            return statuses + ([saga] if saga is not None else [])

    statuses = run(go())
    if as_json:
        for st in statuses:
            click.echo(msgspec.json.encode(st).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="subscription groups")
    columns = (
        "name",
        "group",
        "physical",
        "checkpoint",
        "head",
        "lag (events)",
        "lag (s)",
        "parked",
        "state",
    )
    for column in columns:
        table.add_column(column)
    for st in statuses:
        table.add_row(
            st.name,
            st.group,
            str(st.physical or ""),
            str(st.checkpoint),
            str(st.head_position),
            str(st.lag_events),
            "" if st.lag_seconds is None else f"{st.lag_seconds:.1f}",
            str(st.parked) + (f" (oldest at {st.oldest_parked_position})" if st.parked else ""),
            st.state,
        )
    Console().print(table)


@projections.command("rebuild")
@click.argument("name")
@store_options
def projections_rebuild(name: str, **options: Any) -> None:
    """Rebuild NAME into a new table/index and switch to it (no downtime)."""
    settings = settings_from(options)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    async def rebuild() -> Any:
        async with opened(settings) as container:
            runner = _runner(container, name)
            with Progress(
                TextColumn(f"rebuilding {name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("position"),
                TimeElapsedColumn(),
            ) as progress:
                task = progress.add_task(name, total=None)

                def report(position: int, head: int) -> None:
                    progress.update(task, completed=position, total=max(head, position, 1))

                return await runner.rebuild(report)

    async def go() -> Any:
        try:
            return await rebuild()
        except (ReadStoreUnavailable, EventStoreUnavailable) as exc:  # an outage, not a bug: no traceback
            failed = f"rebuilding {name} failed, the alias was left as it was: {exc}"
            raise click.ClickException(failed) from exc

    result = run(go())
    click.echo(
        f"{name}: rebuilt {result.physical} from {result.events} events "
        f"({result.failed} failed); previous: {result.previous}"
    )


@projections.command("parked")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@store_options
def projections_parked(name: str, limit: int, **options: Any) -> None:
    """The events NAME's subscription group has parked (JSON lines). NAME is a
    projection (``orders``) or a group (``saga-order-fulfilment``)."""
    settings = settings_from(options)

    async def go() -> list[Any]:
        async with opened(settings) as container:
            return list(await container.event_store.list_parked(_group(container, name), limit=limit))

    for parked in run(go()):
        line = json.loads(event_json(parked.event))
        line.update(reason=parked.reason, attempts=parked.attempts, parked_at=parked.parked_at.isoformat())
        click.echo(json.dumps(line, ensure_ascii=False))


@projections.command("replay-parked")
@click.argument("name")
@store_options
def projections_replay_parked(name: str, **options: Any) -> None:
    """Deliver NAME's parked events again (after fixing what made them fail). NAME is
    a projection or a subscription group (``saga-order-fulfilment``)."""
    settings = settings_from(options)

    async def go() -> int:
        async with opened(settings) as container:
            return int(await container.event_store.replay_parked(_group(container, name)))

    click.echo(f"{name}: {run(go())} parked events queued for redelivery")


@projections.command("skip")
@click.argument("name")
@click.argument("position", type=click.IntRange(0))
@click.option("--reason", required=True, help="Why the event may be left out (recorded).")
@click.option("--actor", default=None, help="Who skips it (recorded; default: the OS user).")
@store_options
def projections_skip(name: str, position: int, reason: str, actor: str | None, **options: Any) -> None:
    """Drop the parked event at POSITION from NAME's group for good, recording who and
    why: the read model (or the sagas) will do without it, and read-your-writes
    queries past it answer again. ``projections skipped NAME`` lists what was skipped."""
    settings = settings_from(options)
    who = actor or getpass.getuser()
    if not reason.strip():
        raise click.BadParameter("give a reason", param_hint="--reason")

    async def go() -> SkippedEvent:
        async with opened(settings) as container:
            group = _group(container, name)
            try:
                return await container.event_store.skip_parked(group, position, actor=who, reason=reason)
            except ParkedEventNotFound as exc:
                raise click.ClickException(str(exc)) from exc

    skipped = run(go())
    event = skipped.event
    click.echo(
        f"{name}: skipped {event.type} {event.stream}@{event.revision} (position {event.position}), "
        f"by {skipped.actor}: {skipped.reason}"
    )


@projections.command("skipped")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@store_options
def projections_skipped(name: str, limit: int, **options: Any) -> None:
    """The events skipped in NAME's group: who, when, why (JSON lines)."""
    settings = settings_from(options)

    async def go() -> list[SkippedEvent]:
        async with opened(settings) as container:
            return list(await container.event_store.list_skipped(_group(container, name), limit=limit))

    for skipped in run(go()):
        line = json.loads(event_json(skipped.event))
        line.update(
            actor=skipped.actor,
            reason=skipped.reason,
            parked_reason=skipped.parked_reason,
            attempts=skipped.attempts,
            skipped_at=skipped.skipped_at.isoformat(),
        )
        click.echo(json.dumps(line, ensure_ascii=False))


# ----------------------------------------------------------------------------- events


@main.group()
def events() -> None:
    """Read the event store (JSON lines)."""


@events.command("read")
@click.argument("stream")
@click.option("--from-revision", type=click.IntRange(0), default=None)
@click.option("--backwards", is_flag=True)
@click.option("--limit", type=click.IntRange(1), default=None)
@store_options
def events_read(
    stream: str, from_revision: int | None, backwards: bool, limit: int | None, **options: Any
) -> None:
    """Print the events of STREAM (e.g. order-7f3c...)."""
    settings = settings_from(options)

    async def go() -> list[RecordedEvent]:
        async with opened(settings) as container:
            return await container.event_store.read_stream(
                stream, from_revision=from_revision, backwards=backwards, limit=limit
            )

    for event in run(go()):
        click.echo(event_json(event))


@events.command("tail")
@click.option("--after", type=int, default=None, help="Start after this position (default: the head).")
@click.option("--from-start", is_flag=True, help="Start at the beginning of the store.")
@click.option("--category", "categories", multiple=True, help="Only these stream categories (repeatable).")
@click.option("--type", "types", multiple=True, help="Only these event types (repeatable).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Stop after this many events.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Wait for new events.")
@store_options
def events_tail(
    after: int | None,
    from_start: bool,
    categories: tuple[str, ...],
    types: tuple[str, ...],
    limit: int | None,
    follow: bool,
    **options: Any,
) -> None:
    """Print events of ``$all`` as they are appended (Ctrl-C stops)."""
    settings = settings_from(options)
    event_filter = EventFilter(categories=categories, types=types)

    async def go() -> None:
        stop = asyncio.Event()
        with stop_on_signals(stop):
            async with opened(settings) as container:
                store = container.event_store
                start = None if from_start else (after if after is not None else await store.head_position())
                printed = 0
                if not follow:
                    page = await store.read_all(after=start, filter=event_filter, limit=limit)
                    for event in page:
                        click.echo(event_json(event))
                    return
                stream = store.subscribe(after=start, filter=event_filter)
                iterator = stream.__aiter__()
                while not stop.is_set():
                    next_event = asyncio.ensure_future(iterator.__anext__())
                    stopper = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({next_event, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if not next_event.done():
                        next_event.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                            await next_event
                        break
                    try:
                        event = next_event.result()
                    except StopAsyncIteration:
                        break
                    click.echo(event_json(event))
                    printed += 1
                    if limit is not None and printed >= limit:
                        break
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

    run(go())


# ---------------------------------------------------------------------------- webhook


@main.group()
def webhook() -> None:
    """The payment provider's webhook (POST /payments/{payment_id}/webhook)."""


@webhook.command("sign")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the generated secret is [env ORDERSTREAM_DATA_DIR; ./data].",
)
@click.option("--body", "body_file", type=click.File("rb"), required=True, help="Body file (-: stdin).")
@click.option("--timestamp", type=click.IntRange(0), default=None, help="Unix seconds [now].")
def webhook_sign(data_dir: Path | None, body_file: Any, timestamp: int | None) -> None:
    """Print the Orderstream-Signature header value for a webhook body, signed as the
    payment provider does, with ORDERSTREAM_WEBHOOK_SECRET or the data dir's secret
    (generated if there is none yet). Send the body byte for byte as signed."""
    settings = settings_from({"data_dir": data_dir, "log_level": "warning"})
    secrets = webhook_signature.webhook_secrets(settings.webhook_secrets, settings.data_dir)
    signed_at = int(time.time()) if timestamp is None else timestamp
    click.echo(webhook_signature.sign(body_file.read(), secrets[:1], signed_at))


@main.group()
def tokens() -> None:
    """Bearer tokens of the local issuer (when ORDERSTREAM_AUTH_ISSUER is unset)."""


@tokens.command("issue")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The server's data directory, where the signing key is [env ORDERSTREAM_DATA_DIR; ./data].",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice([r.value for r in Role]),
    help="A role of the token (repeatable).",
)
@click.option("--customer-id", default=None, help="The customer the token acts for (customer role).")
@click.option(
    "--subject", default=None, help="The token's sub, recorded as the actor [customer id or local-ROLE]."
)
@click.option(
    "--ttl", type=click.IntRange(1, MAX_TTL), default=DEFAULT_TTL, show_default=True, help="Seconds."
)
def tokens_issue(
    data_dir: Path | None, roles: tuple[str, ...], customer_id: str | None, subject: str | None, ttl: int
) -> None:
    """Sign a token with the local key (created if the server has not yet); the
    token is the last line on stdout: TOKEN=$(orderstream tokens issue ... | tail -n 1)."""
    settings = settings_from({"data_dir": data_dir, "log_level": "warning"})
    if settings.auth_issuer:
        raise click.UsageError(
            f"ORDERSTREAM_AUTH_ISSUER is set: tokens come from {settings.auth_issuer}, not from this command"
        )
    token = issue_token(settings, roles, customer_id=customer_id, subject=subject, ttl=ttl)
    click.echo(f"# {', '.join(roles)} token for the server of {settings.data_dir}, valid {ttl} s", err=True)
    click.echo(token)


if __name__ == "__main__":  # pragma: no cover
    main()
