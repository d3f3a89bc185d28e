"""What authentication costs a request.

1. wrk on ``GET /products/{sku}`` against ``orderstream serve --no-sagas --workers 1``
   (one process: the API and the projections) with auth on (an admin
   bearer token: verified once, then found in the verifier's cache), beside the
   reference measured in the same run: the same command with ``--no-auth``. The two
   servers run one after the other, twice each, alternating (the machine is shared).
2. The verification alone (``TokenVerifier.verify``): a token seen for the first time
   (EdDSA from the local issuer, RS256 as Keycloak signs) and a token seen before,
   beside the reference of one whole request to the auth-off server (1 / its req/s).
3. ``--profile``: py-spy samples the auth-on server during one wrk run and prints the
   share of samples inside ``orderstream/auth`` and the guard's top frames.

    .venv/bin/python -m bench.auth_cost [--seconds 8] [--connections 16] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from orderstream.auth.local_issuer import issue_token
from orderstream.auth.verifier import TokenVerifier
from orderstream.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SKU = "BENCH-AUTH"
ON = "auth on (bearer token)"
OFF = "auth off (reference)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "orderstream.cli", "serve", "--no-sagas", "--port", str(port)]
    argv += ["--workers", "1"]
    process = subprocess.Popen(
        [*argv, "--data-dir", str(data_dir), "--log-level", "warning", *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("orderstream api did not start")


def seed(url: str, headers: dict[str, str]) -> None:
    body = b'{"sku": "%s", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}' % SKU.encode()
    request = urllib.request.Request(
        f"{url}/products", data=body, headers={**headers, "content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the read model catches up
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{url}/products/{SKU}", headers=headers), timeout=2
            ):
                return
        except OSError:
            time.sleep(0.1)


WrkFigures = tuple[float, float, int]


def wrk(url: str, headers: dict[str, str], seconds: int, connections: int) -> WrkFigures:
    """req/s, p99 ms and non-2xx answers of wrk on ``url``."""
    options = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", *options, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99_text = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    assert p99_text is not None
    p99 = float(p99_text.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99_text.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, p99, int(bad.group(1)) if bad else 0


def profile_share(pid: int, seconds: int, run: Callable[[], WrkFigures]) -> WrkFigures:
    """``run()`` under py-spy; prints the share of samples under orderstream/auth."""
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("  (py-spy is not installed: pip install py-spy)")
        return run()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        recorder = subprocess.Popen(
            [spy, "record", "-p", str(pid), "-d", str(seconds), "-f", "raw", "-o", out.name, "-r", "200"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        figures = run()
        recorder.wait(timeout=seconds + 30)
        total = 0
        in_auth = 0
        leaves: collections.Counter[str] = collections.Counter()
        for line in Path(out.name).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            if "orderstream/auth/" in stack:
                in_auth += n
                leaves[stack.split(";")[-1]] += n
    if total:
        share = f"{in_auth / total:.1%} of {total} samples"
        print(f"  py-spy: {share} of the auth-on server inside orderstream/auth; its top frames:")
        for frame, n in leaves.most_common(4):
            print(f"    {n / total:6.2%}  {frame[:100]}")
    return figures


async def verify_costs(data_dir: Path, n: int) -> dict[str, float]:
    """Microseconds per verify(): new EdDSA token, new RS256 token, a token seen before."""
    settings = Settings(data_dir=data_dir)
    local = TokenVerifier(settings)
    eddsa = [issue_token(settings, ["admin"], subject=f"user-{i}") for i in range(n)]
    started = time.perf_counter()
    for token in eddsa:
        await local.verify(token)
    cold_eddsa = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(10):
        for token in eddsa:
            await local.verify(token)
    cached = (time.perf_counter() - started) / (10 * n) * 1e6

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.PyJWK(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True) | {"kid": "k1"})

    class Keys:
        async def key_for(self, kid: str | None) -> jwt.PyJWK:
            return public

    issuer = "https://idp.example/realms/orderstream"
    rs = TokenVerifier(Settings(data_dir=data_dir, auth_issuer=issuer), keys=Keys())
    now = int(time.time())
    rs256 = [
        jwt.encode(
            {
                "iss": issuer,
                "aud": "orderstream",
                "sub": f"u{i}",
                "exp": now + 600,
                "realm_access": {"roles": ["admin"]},
            },
            private,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        for i in range(n)
    ]
    started = time.perf_counter()
    for token in rs256:
        await rs.verify(token)
    cold_rs256 = (time.perf_counter() - started) / n * 1e6
    return {"new EdDSA token": cold_eddsa, "new RS256 token": cold_rs256, "token seen before": cached}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="auth-cost-"))
    on_dir, off_dir = work / "on", work / "off"
    token = issue_token(Settings(data_dir=on_dir), ["admin"], ttl=3600)
    bearer = {"Authorization": f"Bearer {token}"}
    results: dict[str, list[WrkFigures]] = {ON: [], OFF: []}
    for round_ in range(2):
        for label, data_dir, extra, headers in (
            (ON, on_dir, (), bearer),
            (OFF, off_dir, ("--no-auth",), {}),
        ):
            process, url = start(data_dir, *extra)
            try:
                if round_ == 0:
                    seed(url, headers)
                target = f"{url}/products/{SKU}"
                wrk(target, headers, 2, args.connections)  # warm-up
                measure = functools.partial(wrk, target, headers, args.seconds, args.connections)
                if args.profile and round_ == 1 and label == ON:
                    results[label].append(profile_share(process.pid, args.seconds, measure))
                else:
                    results[label].append(measure())
            finally:
                process.terminate()
                process.wait(timeout=60)
    print(f"GET /products/{{sku}}, wrk -t2 -c{args.connections} -d{args.seconds}s, one orderstream process")
    for label, runs in results.items():
        figures = ", ".join(f"{rate:,.0f} req/s (p99 {p99:.1f} ms, non-2xx {bad})" for rate, p99, bad in runs)
        print(f"  {label:24} {figures}")
    reference_us = 1e6 / max(rate for rate, _, _ in results[OFF])
    costs = asyncio.run(verify_costs(work / "micro", 500))
    print(f"TokenVerifier.verify, per call (reference: one whole auth-off request, {reference_us:.0f} us)")
    for label, micro in costs.items():
        print(f"  {label:24} {micro:8.1f} us")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
