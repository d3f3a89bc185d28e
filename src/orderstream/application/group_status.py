"""One status line per subscription group the service consumes (each projection's
and the saga trigger's), for operators: ``orderstream projections status``.

A projection's status says more (its physical collection, whether it is refilling a
lost read model); the saga trigger's group has only what the event store knows.
"""

from __future__ import annotations

import msgspec

from orderstream.application.projection_progress import ProjectionStatus
from orderstream.eventstore.base import EventStore, SubscriptionGroupNotFound


class GroupStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    """What an operator types: the projection's name, or the group's."""
    group: str
    physical: str | None = None
    checkpoint: int | None
    head_position: int | None
    lag_events: int
    lag_seconds: float | None
    """``None`` where the group's filter is not known here (the saga trigger's)."""
    in_flight: int
    parked: int
    oldest_parked_position: int | None
    state: str
    """``rebuilding`` (refilling a lost read model), ``parked`` (an event waits for an
    operator: replay or skip it), ``catching up`` or ``current``."""

    @classmethod
    def of_projection(cls, st: ProjectionStatus) -> GroupStatus:
        return cls(
            name=st.name,
            group=st.group,
            physical=st.physical,
            checkpoint=st.checkpoint,
            head_position=st.head_position,
            lag_events=st.lag_events,
            lag_seconds=st.lag_seconds,
            in_flight=st.in_flight,
            parked=st.parked,
            oldest_parked_position=st.oldest_parked_position,
            state=state_of(rebuilding=st.rebuilding, parked=st.parked, lag_events=st.lag_events),
        )

    @classmethod
    async def of_group(cls, event_store: EventStore, group: str) -> GroupStatus | None:
        """``None`` when the group does not exist (that consumer never ran here)."""
        try:
            info = await event_store.subscription_group_info(group)
        except SubscriptionGroupNotFound:
            return None
        parked = await event_store.list_parked(group, limit=1000) if info.parked else []
        return cls(
            name=group,
            group=group,
            checkpoint=info.checkpoint,
            head_position=info.last_position,
            lag_events=info.lag_events,
            lag_seconds=None,
            in_flight=info.in_flight,
            parked=info.parked,
            oldest_parked_position=min((p.event.position for p in parked), default=None),
            state=state_of(rebuilding=False, parked=info.parked, lag_events=info.lag_events),
        )


def state_of(*, rebuilding: bool, parked: int, lag_events: int) -> str:
    if rebuilding:
        return "rebuilding"
    if parked:
        return "parked"
    return "catching up" if lag_events else "current"
