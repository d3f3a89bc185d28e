"""What the connection guard (:mod:`orderstream.api.connections`) costs per request.

The bare app of ``bench.bare_app`` (``GET /health``) served by uvicorn + httptools +
uvloop twice, in turns: with uvicorn's own httptools protocol (the reference) and
with :class:`~orderstream.api.connections.GuardedHttpToolsProtocol` (a header timer
armed and cancelled per request, a dict entry per waiting connection). wrk, 32
keep-alive connections, then 256 connections each closed after one request (the
guard's connection events on every request); rounds alternate so that a noisy
neighbour hits both alike.

    python -m bench.connection_guard [--seconds 10] [--rounds 2]

On a loaded machine the rounds scatter widely (3,000 to 17,000/s for one server
on 2 shared cores): compare on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import time

import uvicorn

from orderstream.api.connections import guarded_protocol
from orderstream.config import ConnectionLimits


def serve(kind: str, port: int) -> None:
    http: type[asyncio.Protocol] | str = (
        guarded_protocol(ConnectionLimits()) if kind == "guarded" else "httptools"
    )
    config = uvicorn.Config(
        "bench.bare_app:app", port=port, http=http, loop="uvloop", access_log=False, log_level="warning"
    )
    uvicorn.Server(config).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"no server on port {port}")


def wrk(url: str, seconds: int, connections: int, close: bool) -> float:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", url]
    if close:
        command[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(out)
    return float(found.group(1))


def measure(kind: str, seconds: int) -> tuple[float, float]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.connection_guard", "--serve", kind, "--port", str(port)]
    )
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}/health"
        wrk(url, 2, 32, False)  # warm-up
        return wrk(url, seconds, 32, False), wrk(url, seconds, 256, True)
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=["plain", "guarded"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "guarded": []}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(measure(kind, args.seconds))
    # Best of the rounds: what a neighbour's load takes away is noise, never the guard's cost.
    keep = {k: max(r[0] for r in v) for k, v in runs.items()}
    fresh = {k: max(r[1] for r in v) for k, v in runs.items()}
    print(f"GET /health, bare app, uvicorn + httptools + uvloop, best of {args.rounds} rounds")
    print(
        f"32 keep-alive connections:   guarded {keep['guarded']:9,.0f}/s   "
        f"reference (uvicorn's protocol) {keep['plain']:9,.0f}/s   {keep['guarded'] / keep['plain']:.2f}x"
    )
    print(
        f"256 connections, 1 request each: guarded {fresh['guarded']:6,.0f}/s   "
        f"reference {fresh['plain']:9,.0f}/s   {fresh['guarded'] / fresh['plain']:.2f}x"
    )


if __name__ == "__main__":
    main()
