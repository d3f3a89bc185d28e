"""CPU per command with tracing off and on: ``python -m bench.tracing_cost``.

The command handler's own share of tracing, in-process and without HTTP noise:
``--commands`` ``AddStock`` commands through ``CommandHandler.handle`` on a SQLite
event store, one at a time, in interleaved rounds of

- **off**: no provider configured (the shipped default): the reference;
- **on**: :func:`orderstream.tracing.configure` with an exporter that drops what it
  gets, so the figure is the spans' creation, context and ending (``command`` and
  ``append`` per command, the traceparent in the metadata) without encoding or
  transport (the OTLP exporter's thread is in the ``bench.load`` profile, see
  docs/operations.md, Tracing).

CPU time is the process's (every thread), per command; the append's fsync waits are
not CPU, so a busy disk blurs the rates but not these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from orderstream import tracing
from orderstream.application.commands import CommandContext, CommandHandler
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.sqlite import SqliteEventStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Dropping(SpanExporter):
    """Takes every span and keeps none."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def cpu_per_command(handler: CommandHandler, sku: str, count: int) -> float:
    stream = inventory.stream_name(sku)
    context = CommandContext(actor="bench")
    start = time.process_time()
    for _ in range(count):
        command = inventory.AddStock(sku=sku, quantity=1, now=NOW)
        await handler.handle(inventory.decider, stream, command, context=context)
    return (time.process_time() - start) / count


async def measure(folder: Path, commands: int, rounds: int) -> dict[str, list[float]]:
    store = await SqliteEventStore.open(folder / "events.db")
    handler = CommandHandler(store, registry)
    figures: dict[str, list[float]] = {"off": [], "on": []}
    exporter = Dropping()
    try:
        for n in range(rounds):
            for variant in ("off", "on"):
                sku = f"SKU-{variant}-{n}"
                price = Money(100, "EUR")
                await handler.handle(
                    inventory.decider,
                    inventory.stream_name(sku),
                    inventory.RegisterProduct(sku=sku, name=sku, price=price, now=NOW),
                )
                if variant == "on":
                    tracing.configure(exporter=exporter)
                try:
                    figures[variant].append(await cpu_per_command(handler, sku, commands))
                finally:
                    tracing.shutdown()
    finally:
        await store.close()
    assert exporter.spans >= 2 * commands * rounds, "tracing on made no spans"
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=500, help="commands per round (default 500)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as folder:
        figures = asyncio.run(measure(Path(folder), args.commands, args.rounds))
    off, on = (sorted(figures[v])[len(figures[v]) // 2] for v in ("off", "on"))
    print(f"CPU per command, median of {args.rounds} interleaved rounds of {args.commands}:")
    print(f"  tracing off (reference): {off * 1e6:7.1f} us")
    print(f"  tracing on:              {on * 1e6:7.1f} us  (+{(on - off) * 1e6:.1f} us, {on / off:.2f}x)")


if __name__ == "__main__":
    main()
