"""Hostile connections (issue 12, item 3) against a real ``orderstream api`` process
on loopback, started with ``ulimit -n 1024`` and short timeouts.

Thousands of connections that never send a request, or trickle their request
head, or announce more body than they send, or never read their answers, must
neither starve ``/health`` and a normal ``POST /orders`` nor stay open: each is
closed within its timeout. The
answers under attack are asserted within a generous bound (:data:`ANSWER_BOUND`,
20 times the issue's 100 ms, so a loaded machine does not fail it while a server
that stalls, as before, for 30 s does); the measured times are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.api.helpers import order_body
from tests.api.test_cli import _env
from tests.tokens import bearer, token_for

HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
KEEP_ALIVE_TIMEOUT = 1.0
SEND_TIMEOUT = 5.0
CAP = 64
"""``ORDERSTREAM_MAX_CONNECTIONS`` of :func:`capped_server`, as in the hostile run."""
FD_LIMIT = 1024
ATTACKERS = 2000
ANSWER_BOUND = 2.0
"""Seconds: the bound asserted on an answer under attack (the target is 100 ms)."""
CLOSE_MARGIN = 3.0
"""Seconds past a timeout by which the server must have closed the connection."""
PRODUCT = {"sku": "SKU-1", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}


_TOKEN: dict[str, str] = {}
"""The admin token of the server under test (set by the ``server`` fixture): attackers
that send a valid token get past the auth guard, so the body timeout is what stops them."""


def _post_orders_head() -> bytes:
    return f"POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {_TOKEN['admin']}\r\n".encode()


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture(scope="module")
def fds_for_attackers() -> None:
    """This process holds the attackers' sockets: it needs more than 2,000 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ATTACKERS + 1000
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def server(tmp_path: Path, fds_for_attackers: None) -> Iterator[str]:
    """``orderstream api`` with 1,024 file descriptors and the test's timeouts; its URL."""
    with _api(tmp_path) as url:
        yield url


@pytest.fixture
def capped_server(tmp_path: Path) -> Iterator[str]:
    """As :func:`server`, with a cap of :data:`CAP` connections; its log is
    ``tmp_path / "stderr.log"``."""
    with _api(tmp_path, ORDERSTREAM_MAX_CONNECTIONS=str(CAP)) as url:
        yield url


@contextlib.contextmanager
def _api(tmp_path: Path, **extra_env: str) -> Iterator[str]:
    env = _env() | {
        "ORDERSTREAM_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "ORDERSTREAM_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "ORDERSTREAM_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
        "ORDERSTREAM_SEND_TIMEOUT": str(SEND_TIMEOUT),
        **extra_env,
    }
    out = tmp_path / "stdout.log"
    with out.open("w") as stdout, (tmp_path / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orderstream.cli",
                "api",
                "--port",
                "0",
                "--data-dir",
                str(tmp_path / "d"),
            ],
            stdout=stdout,
            stderr=stderr,
            env=env,
            preexec_fn=_limit_fds,
        )
        try:
            url = None
            deadline = time.monotonic() + 60
            while url is None and time.monotonic() < deadline and process.poll() is None:
                found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", out.read_text())
                url = found.group(1) if found else None
                time.sleep(0.05)
            assert url is not None, (tmp_path / "stderr.log").read_text()
            _TOKEN["admin"] = token_for(tmp_path / "d")
            with httpx.Client(base_url=url, headers=bearer(_TOKEN["admin"])) as client:
                assert client.post("/products", json=PRODUCT).status_code == 201
                assert client.post("/products/SKU-1/stock", json={"quantity": 1000}).status_code == 200
            yield url
            assert process.poll() is None, "the server died under the attack"
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def _open(url: str, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections (those the server refuses outright are left out)."""
    host, port = _address(url)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, count, 200):
        batch = await asyncio.gather(
            *(asyncio.open_connection(host, port) for _ in range(start, min(count, start + 200))),
            return_exceptions=True,
        )
        opened += [pair for pair in batch if isinstance(pair, tuple)]
    return opened


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (whatever it
    answers first is read and dropped)."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


@contextlib.asynccontextmanager
async def _held(
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for _reader, writer in connections:
            writer.close()


async def _answers_promptly(url: str) -> dict[str, float]:
    """``GET /health`` and ``POST /orders``, each on a new connection: their times.
    Asserts the statuses and the generous bound."""
    times: dict[str, float] = {}
    async with httpx.AsyncClient(
        base_url=url,
        timeout=30,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers=bearer(_TOKEN["admin"]),
    ) as c:
        for name, call in (
            ("GET /health", lambda: c.get("/health")),
            ("POST /orders", lambda: c.post("/orders", json=order_body())),
        ):
            started = time.perf_counter()
            response = await call()
            times[name] = time.perf_counter() - started
            assert response.status_code in (200, 201), response.text
    print({k: f"{v * 1000:.1f} ms" for k, v in times.items()})
    assert max(times.values()) < ANSWER_BOUND, times
    return times


async def test_idle_connections_neither_starve_the_server_nor_stay_open(server: str) -> None:
    """2,000 connections that never send a byte, against 1,024 descriptors."""
    idle = await _open(server, ATTACKERS)
    async with _held(idle):
        await _answers_promptly(server)
        closed = await asyncio.gather(
            *(_closed_by_server(reader, HEADER_TIMEOUT + CLOSE_MARGIN) for reader, _ in idle)
        )
        assert all(closed), f"{closed.count(False)} idle connections still open"
    await _answers_promptly(server)


async def test_trickled_request_heads_are_cut_off(server: str) -> None:
    """Slowloris: 2,000 connections send a request head a header line per second;
    trickling does not keep them open past the header timeout."""
    slow = await _open(server, ATTACKERS)
    stop = asyncio.Event()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            for i in range(100):
                if stop.is_set():
                    return
                await asyncio.sleep(1)
                writer.write(b"X-%d: y\r\n" % i)
                await writer.drain()

    async with _held(slow):
        tricklers = [asyncio.create_task(trickle(writer)) for _, writer in slow]
        try:
            await asyncio.sleep(1)
            await _answers_promptly(server)
            started = time.monotonic()
            closed = await asyncio.gather(
                *(_closed_by_server(reader, HEADER_TIMEOUT + CLOSE_MARGIN) for reader, _ in slow)
            )
            assert all(closed), f"{closed.count(False)} trickling connections still open"
            assert time.monotonic() - started < HEADER_TIMEOUT + CLOSE_MARGIN + 1
        finally:
            stop.set()
            await asyncio.gather(*tricklers, return_exceptions=True)


async def test_a_body_shorter_than_its_content_length_times_out(server: str) -> None:
    """500 POSTs that announce 1,000 bytes and send 10: each gets a 408 problem and
    its connection closed within the body timeout, while others are served."""
    lying = await _open(server, 500)
    head = _post_orders_head() + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    async with _held(lying):
        for _, writer in lying:
            writer.write(head + b'{"customer')
        started = time.monotonic()
        await _answers_promptly(server)

        async def answer(reader: asyncio.StreamReader) -> bytes:
            async with asyncio.timeout(BODY_TIMEOUT + CLOSE_MARGIN):
                return await reader.read()  # to EOF: the server closes

        answers = await asyncio.gather(*(answer(reader) for reader, _ in lying))
        assert time.monotonic() - started < BODY_TIMEOUT + CLOSE_MARGIN
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    assert b"urn:orderstream:problem:body-timeout" in answers[0]


async def test_trickled_uploads_time_out(server: str) -> None:
    """300 uploads that send their body a byte every half second: the body timeout
    bounds the whole body, not the gap between bytes (408, connection closed)."""
    slow = await _open(server, 300)
    head = _post_orders_head() + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"

    async def upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(head)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):
                    await asyncio.sleep(0.5)
                    writer.write(b" ")
                    await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(BODY_TIMEOUT + CLOSE_MARGIN):
                return await reader.read()  # to EOF: the server closes
        except ConnectionResetError:
            # Closed with our bytes still unread: the kernel resets the connection,
            # and the 408 sent before may be lost with it. Closed all the same.
            return b"reset"
        finally:
            trickling.cancel()

    async with _held(slow):
        started = time.monotonic()
        uploads = asyncio.gather(*(upload(reader, writer) for reader, writer in slow))
        await asyncio.sleep(0.5)
        await _answers_promptly(server)
        answers = await uploads
        assert time.monotonic() - started < BODY_TIMEOUT + CLOSE_MARGIN
    assert all(a.startswith(b"HTTP/1.1 408 ") or a == b"reset" for a in answers), {a[:40] for a in answers}


async def test_an_oversized_content_length_is_413_before_the_body(server: str) -> None:
    """A Content-Length over the limit is refused at once, nothing of the body read,
    and the connection closed (the rest is not worth reading)."""
    (reader, writer), *_ = await _open(server, 1)
    writer.write(
        _post_orders_head() + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    )
    async with asyncio.timeout(ANSWER_BOUND):
        answer = await reader.read()  # to EOF
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    problem = msgspec.json.decode(answer.split(b"\r\n\r\n", 1)[1])
    assert problem["type"] == "urn:orderstream:problem:body-too-large"


async def _send_head(url: str, head: bytes) -> bytes:
    """Send ``head`` on a new connection; what the server answers before it closes."""
    (reader, writer), *_ = await _open(url, 1)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            await writer.drain()
        async with asyncio.timeout(ANSWER_BOUND):
            return await reader.read()  # to EOF: the server closes
    finally:
        writer.close()


def _problem_type(answer: bytes) -> str:
    return str(msgspec.json.decode(answer.split(b"\r\n\r\n", 1)[1])["type"])


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X%d: a\r\n" % i for i in range(200_000))
        + b"\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: a\r\n" % i for i in range(101)) + b"\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Unfinished: " + b"a" * 40_000,  # no end: never completes
    ],
    ids=["200k-header-lines", "2-MB-header", "101-header-lines", "40-KB-unfinished"],
)
async def test_an_oversized_request_head_is_431_and_closed(server: str, head: bytes) -> None:
    """httptools parses any head: 100,000 header lines or a 20 MB one were answered 200,
    took a worker to 1 GB and stalled its event loop for seconds (hostile run). Past
    32 KiB or 100 header lines the head is refused as it arrives, within the answer
    bound (not the header timeout), and the connection closed."""
    answer = await _send_head(server, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert _problem_type(answer) == "urn:orderstream:problem:head-too-large"
    await _answers_promptly(server)


async def test_a_large_head_within_the_limit_is_served(server: str) -> None:
    """A 30 KiB header (a big token, many cookies) and 90 header lines are a request."""
    pad = b"X-Pad: " + b"a" * 30_000 + b"\r\n"
    lines = b"".join(b"X%d: a\r\n" % i for i in range(90))
    for extra in (pad, lines):
        answer = await _send_head(
            server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


async def test_an_idle_kept_alive_connection_is_closed(server: str) -> None:
    """After an answer, a silent kept-alive connection is closed by the keep-alive
    timeout (1 s here), well before the header timeout."""
    (reader, writer), *_ = await _open(server, 1)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), ANSWER_BOUND)
    assert first.startswith(b"HTTP/1.1 200 ")
    answered = time.monotonic()
    assert await _closed_by_server(reader, HEADER_TIMEOUT + CLOSE_MARGIN)
    writer.close()
    assert time.monotonic() - answered < HEADER_TIMEOUT


OPENAPI_BURST = b"GET /schema/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 40
"""40 pipelined requests for the public 65 KB OpenAPI document: 2.6 MB of answers,
more than the kernel buffers for a client that reads nothing."""


async def _non_readers(url: str, count: int) -> list[socket.socket]:
    """``count`` connections with a 2 KiB receive buffer that each send
    :data:`OPENAPI_BURST` and never read (those the server refuses are kept too)."""
    loop = asyncio.get_running_loop()
    opened = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: the window
        sock.setblocking(False)
        await loop.sock_connect(sock, _address(url))
        with contextlib.suppress(ConnectionError):
            await loop.sock_sendall(sock, OPENAPI_BURST)
        opened.append(sock)
    return opened


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor aborted this connection. Read from the
    kernel (``TCP_INFO``'s state: 1 is ESTABLISHED), not by reading: a read would let
    the stalled answers through."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 1


async def _open_after(socks: list[socket.socket], deadline: float) -> int:
    """How many of ``socks`` the server has not closed by ``deadline`` (sooner if none)."""
    for _ in range(1000):
        left = sum(map(_still_open, socks))
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)
    return left


async def test_clients_that_never_read_neither_hold_the_cap_nor_stay_open(capped_server: str) -> None:
    """The hostile run: 80 connections against a cap of 64, each with a 2 KiB receive
    buffer, 40 pipelined requests for the OpenAPI document and nothing read. Before,
    each sat in uvicorn's ``drain()`` beyond every timeout, and every newcomer
    (``/health`` too) was closed at once for as long as they stayed. Now a stalled
    connection makes room for a newcomer, and each is aborted within the send timeout."""
    started = time.monotonic()
    stalled = await _non_readers(capped_server, 80)
    try:
        await asyncio.sleep(2)  # their answers have filled the kernel's buffers: stalled
        holding = sum(map(_still_open, stalled))
        assert holding >= CAP - 4, f"only {holding} of them hold the server: not the attack"
        await _answers_promptly(capped_server)
        within = SEND_TIMEOUT + CLOSE_MARGIN
        left = await _open_after(stalled, started + within)
        print(f"{left} open; {time.monotonic() - started:.1f} s after the attack began")
        assert not left, f"{left} connections that read nothing still open after {within} s"
        await _answers_promptly(capped_server)
    finally:
        for sock in stalled:
            sock.close()


async def test_a_client_gone_mid_answer_is_not_an_error(capped_server: str, tmp_path: Path) -> None:
    """Clients that leave while their answers wait for them to read: no ERROR. Before,
    each such connection logged "Exception in ASGI application" with a three-exception
    traceback (the pipelined request behind the stalled one wrote to the closed
    transport): anyone could flood the error log."""
    leaving = await _non_readers(capped_server, 20)
    await asyncio.sleep(2)  # stalled, well within the send timeout
    assert all(map(_still_open, leaving))
    for sock in leaving:
        sock.close()  # with unread bytes: the kernel resets the connection
    await asyncio.sleep(1)
    await _answers_promptly(capped_server)
    log = (tmp_path / "stderr.log").read_text()
    errors = [line for line in log.splitlines() if '"level": "error"' in line or "Traceback" in line]
    assert not errors, errors[0][:2000]


async def test_a_slow_client_that_keeps_reading_gets_every_answer(capped_server: str) -> None:
    """The send timeout bounds a stall, not an answer: a client that reads 2.6 MB of
    pipelined answers at 256 KB/s (about twice the send timeout in all) gets them all."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, _address(capped_server))
        await loop.sock_sendall(sock, OPENAPI_BURST)
        status = b"HTTP/1.1 200 "
        received, answers, tail, started = 0, 0, b"", time.monotonic()
        while answers < 40:
            async with asyncio.timeout(SEND_TIMEOUT + CLOSE_MARGIN):
                chunk = await loop.sock_recv(sock, 16384)
            assert chunk, f"closed after {answers} answers"
            received += len(chunk)
            answers += (tail + chunk).count(status) - tail.count(status)
            tail = (tail + chunk)[-len(status) + 1 :]  # a status line may straddle two reads
            await asyncio.sleep(max(0.0, started + received / 256_000 - time.monotonic()))
        took = time.monotonic() - started
        print(f"{received} bytes in {took:.1f} s")
        assert took > SEND_TIMEOUT
    finally:
        sock.close()
