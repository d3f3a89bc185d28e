"""A stand-in trace backend for benchmarks: ``python -m bench.otlp_sink [PORT]``.

Accepts OTLP/HTTP ``POST /v1/traces`` and answers 200 with an empty
``ExportTraceServiceResponse``, counting the bytes received, so the service's
exporter does all its work (encoding, HTTP) without a Jaeger to run. Used to
measure the cost of tracing on (``docs/operations.md``, Tracing)::

    python -m bench.otlp_sink 4318 &
    OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 \\
        python -m bench.load --scenarios place
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    received = 0
    requests = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        Sink.received += len(self.rfile.read(length))
        Sink.requests += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"otlp sink: {Sink.requests} exports, {Sink.received} bytes", flush=True)


if __name__ == "__main__":
    main()
