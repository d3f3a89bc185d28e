"""What every aggregate shares: money, domain errors and the decider shape.

The domain is pure: no I/O, no clock, no randomness. Commands carry ``now``
and every id they need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Generic, Protocol, TypeVar

import msgspec

Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
MinorUnits = Annotated[int, msgspec.Meta(ge=0, le=10**12, description="integer minor units (cents)")]


class Money(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount: MinorUnits
    currency: Currency

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise CurrencyMismatch(self.currency, other.currency)
        return Money(self.amount + other.amount, self.currency)

    def times(self, quantity: int) -> Money:
        return Money(self.amount * quantity, self.currency)


class DomainError(Exception):
    """A business rule said no. Nothing is appended."""

    code = "domain-error"


class IllegalTransition(DomainError):
    """The command is not allowed in the aggregate's current status."""

    code = "illegal-transition"

    def __init__(self, status: str, action: str) -> None:
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} when {status}")


class NotFound(DomainError):
    """The command needs an aggregate that does not exist."""

    code = "not-found"

    def __init__(self, what: str, ident: str) -> None:
        self.what = what
        self.ident = ident
        super().__init__(f"{what} {ident} does not exist")


class AlreadyExists(DomainError):
    code = "already-exists"

    def __init__(self, what: str, ident: str) -> None:
        self.what = what
        self.ident = ident
        super().__init__(f"{what} {ident} already exists")


class InvalidCommand(DomainError):
    """The command contradicts a rule that only the domain knows (e.g. a quantity
    that exceeds a limit given the current state)."""

    code = "invalid-command"


class CurrencyMismatch(InvalidCommand):
    def __init__(self, left: str, right: str) -> None:
        super().__init__(f"currency {right} does not match {left}")


S = TypeVar("S")
C = TypeVar("C", contravariant=True)
E = TypeVar("E")
V = TypeVar("V", bound=msgspec.Struct)


def conforming(value: V, what: str) -> V:
    """``value`` itself if it meets its own schema (the ``Annotated`` limits), else
    :class:`InvalidCommand`.

    msgspec checks those limits when it decodes, not when a Struct is built in
    Python; a decider that put such a value into an event could append it, and
    the stream could then never be read back.
    """
    try:
        msgspec.convert(msgspec.to_builtins(value), type(value))
    except msgspec.ValidationError as exc:
        raise InvalidCommand(f"{what}: {exc}") from None
    return value


class Decider(Protocol, Generic[C, E, S]):
    """The three pure pieces of an aggregate, plus its stream category.

    A module that defines an aggregate exposes an instance of this protocol
    (``orders.decider``, ``inventory.decider``, ``payments.decider``).
    """

    @property
    def category(self) -> str: ...

    def initial_state(self) -> S: ...

    def evolve(self, state: S, event: E) -> S: ...

    def decide(self, command: C, state: S) -> Sequence[E]: ...


class FunctionalDecider(Generic[C, E, S]):
    """Bundles module-level functions into a :class:`Decider`."""

    __slots__ = ("_decide", "_evolve", "_initial", "category")

    def __init__(
        self,
        category: str,
        initial_state: S,
        evolve: Callable[[S, E], S],
        decide: Callable[[C, S], Sequence[E]],
    ) -> None:
        self.category = category
        self._initial = initial_state
        self._evolve = evolve
        self._decide = decide

    def initial_state(self) -> S:
        return self._initial

    def evolve(self, state: S, event: E) -> S:
        return self._evolve(state, event)

    def decide(self, command: C, state: S) -> Sequence[E]:
        return self._decide(command, state)
