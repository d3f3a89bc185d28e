"""What one saga costs the worker and the Temporal dev server: ``python -m bench.saga_cost``.

Throughput of the sagas on a shared machine swings with the neighbours' load;
the CPU each order costs does not (much). This places ``--orders`` orders
(``tok_approve``, 8 SKUs with ample stock) through the command handler while no
worker polls (the real trigger starts their workflows), then starts the worker
in this process and measures, from then until every saga has ended:

- CPU seconds of this process (the worker: workflow activations and local steps)
  and of the dev server process (its own SQLite file, WAL, as ``serve`` runs it),
  per order, and the orders per second one core of each would sustain;
- per order, from the histories: events, workflow tasks (completed, timed out,
  failed) and local-step markers.

``--variant`` picks worker settings (``orderstream.sagas.fulfilment.settings.WorkerTuning``); run
several to compare them in one sitting (each on a fresh store and dev server):
``python -m bench.saga_cost --variant default --variant tasks8``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from temporalio.api.enums.v1 import EventType

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES, workflow_id_for
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway
from orderstream.sagas.fulfilment.settings import WorkerTuning
from orderstream.sagas.fulfilment.trigger import SagaTrigger
from orderstream.sagas.fulfilment.worker import run_worker
from orderstream.sagas.runtime import start_dev_server

VARIANTS = {
    "default": WorkerTuning(),
    "sandboxed": WorkerTuning(sandbox=True),
    "tasks8": WorkerTuning(max_concurrent_workflow_tasks=8, workflow_threads=8),
    "tasks2": WorkerTuning(max_concurrent_workflow_tasks=2, workflow_threads=2),
    "tasks8-steps16": WorkerTuning(
        max_concurrent_workflow_tasks=8, workflow_threads=8, max_concurrent_local_activities=16
    ),
}
ADDRESS = orders.Address(name="Ada", line1="1 Main St", city="Utrecht", postal_code="3511", country="NL")
SKUS = [f"COST-{i}" for i in range(8)]
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def dev_server_pid() -> int:
    """The ``temporal`` child of this process."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat.split(") ", 1)
            if int(rest.split()[1]) == me and name.endswith("(temporal"):
                return int(entry.name)
    raise RuntimeError("no temporal child process found")


async def started(container: Container) -> None:
    """Until the trigger has started every workflow (none has run yet)."""
    info = container.event_store.subscription_group_info
    while (await info("saga-order-fulfilment")).lag_events:  # noqa: ASYNC110 (polling another component)
        await asyncio.sleep(0.2)


async def run_variant(
    name: str, tuning: WorkerTuning, count: int, workdir: Path, *, memory_db: bool = False
) -> dict[str, float]:
    data = workdir / f"{name}-{uuid.uuid4().hex[:6]}"
    _address, env = await start_dev_server(
        None if memory_db else data, port=None, ui=False, search_attributes=SEARCH_ATTRIBUTES
    )
    container = await build(Settings(data_dir=data))
    task_queue = f"cost-{uuid.uuid4().hex}"
    stop = asyncio.Event()
    trigger = SagaTrigger(container.event_store, env.client, task_queue, payment_deadline_seconds=60)
    trigger_task = asyncio.create_task(trigger.run(stop))
    try:
        ctx = CommandContext(actor="bench")
        for sku in SKUS:
            await container.use_cases.register_product(sku, sku.lower(), Money(100, "EUR"), ctx)
            await container.use_cases.add_stock(sku, 1_000_000, ctx)
        server = dev_server_pid()
        start_cpu = cpu_seconds(server)
        order_ids = []
        for i in range(count):
            placed = await container.use_cases.place_order(
                customer_id="c",
                lines=[LineRequest(SKUS[i % len(SKUS)], 1)],
                shipping_address=ADDRESS,
                payment_token="tok_approve",
                context=CommandContext(actor="bench"),
            )
            order_ids.append(placed.state.order_id)
        await started(container)
        start_cpu = cpu_seconds(server) - start_cpu
        worker_cpu, server_cpu, wall = cpu_seconds(os.getpid()), cpu_seconds(server), time.monotonic()
        gateway = SandboxPaymentGateway()
        worker = asyncio.create_task(
            run_worker(env.client, container.use_cases, gateway, task_queue, stop, tuning)
        )
        handles = [env.client.get_workflow_handle(workflow_id_for(o)) for o in order_ids]
        for handle in handles:
            await handle.result()
        worker_cpu = cpu_seconds(os.getpid()) - worker_cpu
        server_cpu = cpu_seconds(server) - server_cpu
        wall = time.monotonic() - wall
        events: Counter[str] = Counter()
        sample = handles[:: max(1, len(handles) // 50)]
        for handle in sample:
            history = await handle.fetch_history()
            events.update(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events)
        stop.set()
        await worker
    finally:
        stop.set()
        await trigger_task
        await container.close()
        await env.shutdown()
    per = {k: v / len(sample) for k, v in events.items()}
    return {
        "wall_s": wall,
        "orders_per_s": count / wall,
        "worker_cpu_ms": 1000 * worker_cpu / count,
        "server_cpu_ms": 1000 * server_cpu / count,
        "start_cpu_ms": 1000 * start_cpu / count,
        "events": sum(per.values()),
        "wft_completed": per.get("WORKFLOW_TASK_COMPLETED", 0.0),
        "wft_timed_out": per.get("WORKFLOW_TASK_TIMED_OUT", 0.0),
        "wft_failed": per.get("WORKFLOW_TASK_FAILED", 0.0),
        "markers": per.get("MARKER_RECORDED", 0.0),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None)
    parser.add_argument(
        "--memory-db",
        action="store_true",
        help="also the first variant with the dev server's state in memory",
    )
    args = parser.parse_args()
    names = args.variant or ["default"]
    with tempfile.TemporaryDirectory(prefix="saga-cost-") as workdir:
        results = {
            name: await run_variant(name, VARIANTS[name], args.orders, Path(workdir)) for name in names
        }
        if args.memory_db:
            memory = await run_variant(
                names[0], VARIANTS[names[0]], args.orders, Path(workdir), memory_db=True
            )
            results[f"{names[0]} (memory db)"] = memory
    print(f"{args.orders} sagas (tok_approve), worker in this process, dev server with its SQLite file")
    head = f"{'variant':<22}{'wall s':>7}{'sagas/s':>8}{'worker ms':>10}{'server ms':>10}{'start ms':>9}"
    head += f"{'/core w':>9}{'/core s':>9}{'events':>8}{'WFT ok':>8}{'WFT t/o':>8}{'markers':>8}"
    print(head)
    for name, r in results.items():
        server_ms = r["server_cpu_ms"] + r["start_cpu_ms"]
        print(
            f"{name:<22}{r['wall_s']:7.1f}{r['orders_per_s']:8.1f}{r['worker_cpu_ms']:10.1f}"
            f"{r['server_cpu_ms']:10.1f}{r['start_cpu_ms']:9.1f}{1000 / r['worker_cpu_ms']:9.0f}"
            f"{1000 / server_ms:9.0f}"
            f"{r['events']:8.1f}{r['wft_completed']:8.2f}{r['wft_timed_out']:8.2f}{r['markers']:8.1f}"
        )
    print(
        "worker/server ms: CPU per saga while the sagas ran; start ms: the dev server's CPU per "
        "workflow start (the trigger's, while orders were placed); /core: sagas per second one "
        "core of the worker / of the dev server (run + start) would sustain"
    )


if __name__ == "__main__":
    asyncio.run(main())
