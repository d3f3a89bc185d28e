"""The long-running parts of a process and how they run: :class:`BackgroundService`
(anything with ``name`` and ``async run(stop)``), :func:`run_services` (run them
until ``stop``, restart one paused by a full disk) and :func:`run_child_process`
(a service that is a child process: API workers, saga workers), and
:func:`retry_until_stopped` (a service waiting for something to come back).

``orderstream serve`` runs the projection runners, the saga's services and the
API workers this way; the composition root (:mod:`orderstream.bootstrap`,
:mod:`orderstream.cli`) decides which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter
from tenacity.wait import wait_base

from orderstream.application.errors import StorageFull

log = logging.getLogger("orderstream")

T = TypeVar("T")


class BackgroundService(Protocol):
    """A long-running part of the process: runs until ``stop`` is set, then returns."""

    @property
    def name(self) -> str: ...

    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass
class FunctionService:
    """Adapts ``async def fn(stop)`` to :class:`BackgroundService`."""

    name: str
    fn: Callable[[asyncio.Event], Awaitable[None]]

    async def run(self, stop: asyncio.Event) -> None:
        await self.fn(stop)


STORAGE_FULL_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before restarting a service stopped by a full disk (the last one repeats)."""


async def run_services(services: list[BackgroundService], stop: asyncio.Event) -> None:
    """Run every service until ``stop`` is set; a service that crashes is logged
    and sets ``stop`` (the process shuts down rather than limp on without it).

    Except on a full disk (:class:`~orderstream.application.errors.StorageFull`):
    that stops every writer alike and passes when space is freed, so the service
    is restarted after a growing delay while the API goes on answering reads (and
    507 to writes)."""

    async def guarded(service: BackgroundService) -> None:
        restarts = 0
        while not stop.is_set():
            try:
                await service.run(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _storage_full(exc):
                    log.exception("%s failed; shutting down", service.name)
                    stop.set()
                    return
                delay = STORAGE_FULL_RESTART_DELAYS[min(restarts, len(STORAGE_FULL_RESTART_DELAYS) - 1)]
                restarts += 1
                log.warning(
                    "%s paused: the disk is full (%s); restarting in %.0f s", service.name, exc, delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    tasks = [asyncio.create_task(guarded(s), name=s.name) for s in services]
    try:
        await stop.wait()
    finally:
        stop.set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                log.warning("%s did not stop in time; cancelling", task.get_name())
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _storage_full(exc: BaseException) -> bool:
    """A :class:`StorageFull`, or a group of errors (a service's task group) that
    are all one."""
    if isinstance(exc, BaseExceptionGroup):
        _full, rest = exc.split(StorageFull)
        return rest is None
    return isinstance(exc, StorageFull)


CHILD_RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before starting again a child process that exited on its own; the delay
grows while it keeps exiting within :data:`CHILD_STABLE_AFTER` of its start (the
last one repeats) and starts over after it ran longer."""
CHILD_STABLE_AFTER = 30.0


def niced(argv: Sequence[str], by: int) -> list[str]:
    """``argv`` run ``by`` nice steps below this process (``by`` <= 0: unchanged), through
    coreutils' ``nice``: the program starts at that priority, and so does every thread it
    starts (renicing a running process reaches only its main thread on Linux).

    Background work of ``serve`` (the saga worker processes, the embedded Temporal dev
    server) runs at a lower CPU priority than the API: under more load than the cores
    carry, requests keep their latency and the sagas fall behind (saga lag, in ``/ready``
    and ``/metrics``) and catch up once the load drops, instead of every process slowing
    down alike (issue 7: on 2 cores the dev server and the worker took about 0.75 of a
    core from the API under ``POST /orders`` load). Niceness is capped at 19, so a
    ``serve`` that runs nice already keeps a smaller gap."""
    if by <= 0:
        return list(argv)
    nice = shutil.which("nice")
    if nice is None:
        log.warning("no 'nice' program on PATH: %s runs at the API's CPU priority", argv[0])
        return list(argv)
    return [nice, "-n", str(by), *argv]


async def run_child_process(
    name: str,
    argv: Sequence[str],
    stop: asyncio.Event,
    *,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    nice: int = 0,
) -> None:
    """Run ``argv`` as a child process until ``stop`` is set, then send it SIGTERM and
    wait while it drains (its own graceful shutdown). The body of every
    worker-process service (API workers, saga workers).

    A child that exits on its own (a crash, a store it cannot open on a full disk,
    a kill) is logged and started again after a delay (:data:`CHILD_RESTART_DELAYS`):
    the process set goes on without it meanwhile rather than exit with it.
    ``on_line`` gets each line the child prints (its stdout is piped then); ``nice``: how
    much lower the child's CPU priority is than ours (:func:`niced`)."""
    quick_exits = 0
    while not stop.is_set():
        started = time.monotonic()
        code = await _run_child_once(name, argv, stop, env=env, on_line=on_line, nice=nice)
        if stop.is_set():
            return
        quick_exits = quick_exits + 1 if time.monotonic() - started < CHILD_STABLE_AFTER else 1
        delay = CHILD_RESTART_DELAYS[min(quick_exits, len(CHILD_RESTART_DELAYS)) - 1]
        log.error("%s exited with status %s; starting it again in %.1f s", name, code, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


async def _run_child_once(
    name: str,
    argv: Sequence[str],
    stop: asyncio.Event,
    *,
    env: Mapping[str, str] | None,
    on_line: Callable[[str], None] | None,
    nice: int,
) -> int:
    """Until the child exits (after SIGTERM once ``stop`` is set); its status."""
    stdout = asyncio.subprocess.PIPE if on_line is not None else None
    process = await asyncio.create_subprocess_exec(*niced(argv, nice), env=env, stdout=stdout)
    relay = None
    if on_line is not None:
        relay = asyncio.create_task(_relay_lines(process, on_line), name=f"{name}-output")
    exited = asyncio.ensure_future(process.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        return await exited
    finally:
        stopping.cancel()
        if process.returncode is None:  # cancelled while draining
            process.kill()
        if relay is not None:
            await relay


async def _relay_lines(process: asyncio.subprocess.Process, on_line: Callable[[str], None]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        on_line(raw.decode(errors="replace").rstrip())


BACKOFF = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)
"""Between attempts: 0.5 s doubling (with jitter) up to 30 s."""


async def retry_until_stopped(
    attempt: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    *,
    errors: tuple[type[BaseException], ...],
    log_retry: Callable[[int, float], None],
    wait: wait_base = BACKOFF,
) -> T | None:
    """``await attempt()`` until it returns, again after each of ``errors`` with a
        back-off (``wait``, cut short when ``stop`` is set); ``None`` if ``stop`` is set
        first. ``log_retry(attempt, seconds)`` is told of each failed attempt and the
    wait that follows. Any other
        error propagates. The one retry loop of a service that waits for something to
        come back (Temporal's frontend, the dev server, a batch consumer's store and
        downstream)."""

    async def sleep_unless_stopped(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait,
        stop=lambda _state: stop.is_set(),
        sleep=sleep_unless_stopped,
        before_sleep=lambda state: log_retry(state.attempt_number, _next_wait(state)),
        reraise=True,
    )
    try:
        async for try_ in retrying:
            with try_:
                return await attempt()
    except errors:
        pass  # stopped while it was still failing
    return None


def _next_wait(state: RetryCallState) -> float:
    return state.next_action.sleep if state.next_action is not None else 0.0
