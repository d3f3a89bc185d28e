"""Given / when / then for deciders: tests that read as specifications.

    given = spec(orders.decider).given

    def test_cancel_records_the_status_it_left():
        given(placed).when(CancelOrder(...)).then(OrderCancelled(..., previous_status="placed"))

- ``given(*events)`` folds the history with the decider's ``evolve``, from ``initial_state``.
- ``when(command)`` runs ``decide`` on the resulting state.
- ``then(*events)`` asserts exactly these events were decided (in order), and returns
  the state after folding them, for the odd assertion about state.
- ``then_raises(ErrorType)`` asserts the domain said no, and returns the error so a test
  can look at what it carries.
- ``then_nothing()`` asserts ``decide`` returned ``[]``: nothing to do.

Besides what a test states, every outcome also proves that:

- ``evolve`` folds every produced event without error;
- every produced event survives the trip to disk and back (``events.registry``), so a
  decider can never append an event that later cannot be read;
- ``decide`` is pure: the same command on the same state decides the same events, and
  the state it was given is unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import msgspec
import pytest

from orderstream.domain.common import Decider
from orderstream.events import registry
from orderstream.eventstore.base import RecordedEvent

C = TypeVar("C")
E = TypeVar("E")
S = TypeVar("S")
X = TypeVar("X", bound=BaseException)

_RECORDED_AT = datetime(2025, 1, 1, tzinfo=UTC)


def spec(decider: Decider[C, E, S]) -> Spec[C, E, S]:
    """The specification entry point for one decider: ``spec(orders.decider).given(...)``."""
    return Spec(decider)


def fold(decider: Decider[C, E, S], events: Sequence[E], state: S | None = None) -> S:
    """``evolve`` every event in turn, starting from ``state`` (or the initial state)."""
    current = decider.initial_state() if state is None else state
    for event in events:
        current = decider.evolve(current, event)
    return current


def stored_and_read_back(event: object) -> object:
    """The event as the event store would give it back: encoded, recorded, decoded."""
    assert isinstance(event, msgspec.Struct), f"{event!r} is not a msgspec Struct"
    new = registry.to_new_event(event, event_id=uuid.uuid4())
    recorded = RecordedEvent(
        id=new.id,
        stream="test-1",
        revision=0,
        position=0,
        type=new.type,
        schema_version=new.schema_version,
        data=new.data,
        metadata_json=new.metadata.to_json(),
        recorded_at=_RECORDED_AT,
    )
    return registry.decode(recorded)


@dataclass(frozen=True)
class Spec(Generic[C, E, S]):
    decider: Decider[C, E, S]

    def given(self, *events: E) -> Given[C, E, S]:
        return Given(self.decider, fold(self.decider, events))


@dataclass(frozen=True)
class Given(Generic[C, E, S]):
    decider: Decider[C, E, S]
    state: S

    def when(self, command: C) -> When[C, E, S]:
        return When(self.decider, self.state, command)


@dataclass(frozen=True)
class When(Generic[C, E, S]):
    decider: Decider[C, E, S]
    state: S
    command: C

    def _decide(self) -> list[E]:
        before = msgspec.to_builtins(self.state)
        decided = list(self.decider.decide(self.command, self.state))
        assert msgspec.to_builtins(self.state) == before, "decide changed the state it was given"
        assert list(self.decider.decide(self.command, self.state)) == decided, "decide is not deterministic"
        for event in decided:
            assert stored_and_read_back(event) == event, f"{event!r} does not survive the event store"
        fold(self.decider, decided, self.state)  # evolve folds whatever decide produced
        return decided

    def then(self, *expected: E) -> S:
        """Exactly these events were decided; returns the state after them."""
        assert expected, "use then_nothing() to expect no events"
        decided = self._decide()
        assert decided == list(expected), _diff(expected, decided)
        return fold(self.decider, decided, self.state)

    def then_nothing(self) -> None:
        """``decide`` returned ``[]``: the command is already satisfied."""
        decided = self._decide()
        assert decided == [], f"expected no events, decided {decided!r}"

    def then_raises(self, error: type[X]) -> X:
        """The domain refused with ``error`` (or a subclass); returns it."""
        with pytest.raises(error) as caught:
            self.decider.decide(self.command, self.state)
        return caught.value


def _diff(expected: Sequence[object], decided: Sequence[object]) -> str:
    lines = ["decided events differ", "expected:"]
    lines += [f"  {e!r}" for e in expected]
    lines.append("decided:")
    lines += [f"  {e!r}" for e in decided]
    return "\n".join(lines)
