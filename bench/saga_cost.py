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
  failed), markers, and of those the local activities (the rest are patch
  markers).

``--steps`` also runs the saga's local steps directly on ``FulfilmentActivities``
(no Temporal), one saga after another, and prints their CPU per saga and per
step beside ``place_order``'s in the same run; ``--payloads`` prints the CPU of
decoding each step's arguments with the SDK's converter and with the worker's
(``orderstream.sagas.payloads``).

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
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.converter import DataConverter

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.inputs import (
    SEARCH_ATTRIBUTES,
    Amount,
    ConfirmSteps,
    FulfilmentInput,
    Line,
    OrderArgs,
    PaymentArgs,
    PaymentSteps,
    ReserveSteps,
    SettleSteps,
    ShipSteps,
    StepRef,
    StockArgs,
    workflow_id_for,
)
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway
from orderstream.sagas.fulfilment.settings import WorkerTuning
from orderstream.sagas.fulfilment.trigger import SagaTrigger
from orderstream.sagas.fulfilment.worker import run_worker
from orderstream.sagas.payloads import SAGA_DATA_CONVERTER
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
            markers = [e.marker_recorded_event_attributes.marker_name for e in history.events]
            events["local activities"] += markers.count("core_local_activity")
        stop.set()
        await worker
    finally:
        stop.set()
        await trigger_task
        await container.close()
        await env.shutdown()
    local_activities = events.pop("local activities", 0) / len(sample)
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
        "local_activities": local_activities,
    }


async def one_saga(acts: FulfilmentActivities, placed: orders.Order, method: str) -> dict[str, float]:
    """The happy path's steps as the workflow sends them (joined steps, one
    activity each); CPU per step."""
    order_id, sku = placed.order_id, placed.lines[0].sku
    assert placed.total is not None
    wf, payment_id = workflow_id_for(order_id), f"pay-{order_id}"
    amount = Amount(placed.total.amount, placed.total.currency)

    def ref(step: str) -> StepRef:
        return StepRef(wf, step, "bench", "bench")

    def pay(step: str) -> PaymentArgs:
        return PaymentArgs(ref(step), payment_id, order_id, amount, payment_method_id=method)

    def order(step: str, lines: list[Line] | None = None) -> OrderArgs:
        return OrderArgs(ref(step), order_id, lines=lines or [], payment_id=payment_id, tracking_number="T")

    reserves = [StockArgs(ref(f"reserve-stock/{sku}"), order_id, sku, 1)]
    settle = SettleSteps(pay("capture-payment"), [StockArgs(ref(f"commit-stock/{sku}"), order_id, sku)])
    steps: dict[str, Callable[[], Awaitable[object]]] = {
        "reserve+mark": lambda: acts.reserve_and_mark_stock(
            ReserveSteps(reserves, order("mark-stock-reserved", [Line(sku, 1)]))
        ),
        "pay": lambda: acts.request_and_authorise_payment(
            PaymentSteps(pay("request-payment"), pay("authorise-payment"))
        ),
        "confirm": lambda: acts.confirm_paid_order(
            ConfirmSteps(order("mark-payment-authorised"), order("confirm-order"))
        ),
        "ship+settle": lambda: acts.ship_and_settle_order(ShipSteps(order("ship-order"), settle)),
    }
    cpu: dict[str, float] = {}
    for name, step in steps.items():
        before = time.process_time()
        await step()
        cpu[name] = time.process_time() - before
    return cpu


async def direct_steps(count: int, workdir: Path) -> None:
    """``--steps``: the local steps without Temporal, beside ``place_order``."""
    container = await build(Settings(data_dir=workdir / "steps"))
    try:
        ctx = CommandContext(actor="bench")
        for sku in SKUS:
            await container.use_cases.register_product(sku, sku.lower(), Money(100, "EUR"), ctx)
            await container.use_cases.add_stock(sku, 1_000_000, ctx)
        placed = []
        before = time.process_time()
        for i in range(count):
            result = await container.use_cases.place_order(
                customer_id="c",
                lines=[LineRequest(SKUS[i % len(SKUS)], 1)],
                shipping_address=ADDRESS,
                payment_token="tok_approve",
                context=CommandContext(actor="bench"),
            )
            placed.append((result.state, result.appended[0].payment_method_id))
        place_ms = 1000 * (time.process_time() - before) / count
        acts = FulfilmentActivities(container.use_cases, SandboxPaymentGateway())
        total: Counter[str] = Counter()
        for order, method in placed:
            total.update(await one_saga(acts, order, method))
    finally:
        await container.close()
    steps_ms = 1000 * sum(total.values()) / count
    print(f"\nlocal steps run directly (no Temporal), {count} sagas one after another, CPU of this process:")
    print(f"  place_order (1 command): {place_ms:.2f} ms; the saga's 4 activities (9 commands): ", end="")
    print(f"{steps_ms:.2f} ms")
    print("  " + ", ".join(f"{name} {1000 * cpu / count:.2f}" for name, cpu in total.items()) + " (ms)")


def payload_decoding(rounds: int = 2000) -> None:
    """``--payloads``: decoding each step's arguments, the SDK's converter beside the worker's."""
    ref = StepRef("order-fulfilment-o1", "ship-order", "c", "d")
    pay = PaymentArgs(ref, "p1", "o1", Amount(100, "EUR"), payment_method_id="pm")
    values = [
        StockArgs(ref, "o1", "MUG", quantity=1),
        OrderArgs(ref, "o1", lines=[Line("MUG", 1)], payment_id="p1", tracking_number="T"),
        ReserveSteps([StockArgs(ref, "o1", "MUG", quantity=1)], OrderArgs(ref, "o1", lines=[Line("MUG", 1)])),
        PaymentSteps(pay, pay),
        SettleSteps(pay, [StockArgs(ref, "o1", "MUG")]),
        ShipSteps(OrderArgs(ref, "o1", tracking_number="T"), SettleSteps(pay, [StockArgs(ref, "o1", "MUG")])),
        FulfilmentInput("o1", "p1", [Line("MUG", 1)], Amount(100, "EUR"), "c", "d", "pm", 60.0, True),
    ]
    sdk, ours = DataConverter.default.payload_converter, SAGA_DATA_CONVERTER.payload_converter
    print(f"\ndecoding one payload, CPU us ({rounds} rounds): the SDK's converter / the worker's")
    for value in values:
        payloads, hint = sdk.to_payloads([value]), [type(value)]
        figures = []
        for converter in (sdk, ours):
            before = time.process_time()
            for _ in range(rounds):
                converter.from_payloads(payloads, hint)
            figures.append(1e6 * (time.process_time() - before) / rounds)
        print(f"  {type(value).__name__:<16}{figures[0]:8.1f} /{figures[1]:6.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None)
    parser.add_argument(
        "--memory-db",
        action="store_true",
        help="also the first variant with the dev server's state in memory",
    )
    parser.add_argument("--steps", action="store_true", help="also the local steps without Temporal")
    parser.add_argument("--payloads", action="store_true", help="also the payload decoding figures")
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
    head += f"{'/core w':>9}{'/core s':>9}{'events':>8}{'WFT ok':>8}{'WFT t/o':>8}{'markers':>8}{'LAs':>6}"
    print(head)
    for name, r in results.items():
        server_ms = r["server_cpu_ms"] + r["start_cpu_ms"]
        print(
            f"{name:<22}{r['wall_s']:7.1f}{r['orders_per_s']:8.1f}{r['worker_cpu_ms']:10.1f}"
            f"{r['server_cpu_ms']:10.1f}{r['start_cpu_ms']:9.1f}{1000 / r['worker_cpu_ms']:9.0f}"
            f"{1000 / server_ms:9.0f}"
            f"{r['events']:8.1f}{r['wft_completed']:8.2f}{r['wft_timed_out']:8.2f}{r['markers']:8.1f}"
            f"{r['local_activities']:6.1f}"
        )
    print(
        "worker/server ms: CPU per saga while the sagas ran; start ms: the dev server's CPU per "
        "workflow start (the trigger's, while orders were placed); /core: sagas per second one "
        "core of the worker / of the dev server (run + start) would sustain; LAs: local activities "
        "per order (the other markers are patches)"
    )
    if args.steps:
        with tempfile.TemporaryDirectory(prefix="saga-steps-") as workdir:
            await direct_steps(args.orders, Path(workdir))
    if args.payloads:
        payload_decoding()


if __name__ == "__main__":
    asyncio.run(main())
