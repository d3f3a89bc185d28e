"""What the composition root hands to the API and the services: the :class:`Container`.

``orderstream.bootstrap.build`` fills it; the core (the API, the CLI's
operations) reads it. The saga is a :class:`Saga`: a protocol the core declares
and a saga package implements (``orderstream.sagas.fulfilment.FulfilmentSaga``),
so the core reaches the saga's routes and readiness without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orderstream.application.projection_runner import ProjectionRunner
from orderstream.application.queries import Queries
from orderstream.application.use_cases import UseCases
from orderstream.config import Settings
from orderstream.events import EventRegistry
from orderstream.eventstore.base import EventStore
from orderstream.metrics import MeteredCommandHandler, Metrics
from orderstream.readstore.base import ReadStore
from orderstream.services import BackgroundService, FunctionService

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler

    from orderstream.api.schemas import SagaReadiness


class Saga(Protocol):
    """A saga as the API sees it. The composition root registers one
    (``Container.saga``); the API serves its routes and reports its readiness."""

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        """Its HTTP routes (the fulfilment saga: the payment webhook, the status route)."""
        ...

    async def readiness(self, container: Container, within: float) -> SagaReadiness | None:
        """How far it trails, for ``/ready`` and ``/metrics`` (updating the gauges on
        the way); ``None`` when it never ran against this store and is not configured."""
        ...


@dataclass(eq=False)
class Container:
    settings: Settings
    event_store: EventStore
    read_store: ReadStore
    registry: EventRegistry
    metrics: Metrics
    handler: MeteredCommandHandler
    use_cases: UseCases
    queries: Queries
    runners: dict[str, ProjectionRunner]
    """Projection runners by collection name. Built always (queries use them to
    wait for positions, across processes too); run only where asked."""
    saga: Saga | None = None
    """The saga registered by the composition root (``None``: none, e.g. a test of the core)."""
    _closed: bool = False

    @property
    def projection_services(self) -> list[BackgroundService]:
        return [FunctionService(f"projection:{name}", r.run) for name, r in self.runners.items()]

    async def close(self) -> None:
        """Wait for the command handler's snapshot writes, close the read store, then
        the event store (which flushes pending appends)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.handler.close()
        finally:
            try:
                await self.read_store.close()
            finally:
                await self.event_store.close()
