"""Every read model the service maintains, by collection name."""

from __future__ import annotations

from projections import order_summary, product_stock
from projections.base import Projection

ALL_PROJECTIONS: tuple[Projection, ...] = (order_summary.projection, product_stock.projection)


class UnknownProjection(KeyError):
    def __init__(self, name: str) -> None:
        self.name = name
        known = ", ".join(p.schema.name for p in ALL_PROJECTIONS)
        super().__init__(f"no projection named {name!r} (known: {known})")


def get(name: str) -> Projection:
    """The projection whose collection is ``name`` (``"orders"``, ``"products"``)."""
    for projection in ALL_PROJECTIONS:
        if projection.schema.name == name:
            return projection
    raise UnknownProjection(name)


def names() -> list[str]:
    return [p.schema.name for p in ALL_PROJECTIONS]
