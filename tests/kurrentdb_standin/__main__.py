"""``python -m tests.kurrentdb_standin [--port N]``: the KurrentDB STAND-IN as a process."""

from __future__ import annotations

import argparse
import asyncio

from tests.kurrentdb_standin.server import serve


async def main(port: int) -> None:
    server, bound = await serve(port=port)
    print(f"kurrentdb STAND-IN (not KurrentDB) listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args().port))
