"""The caller of a request, as the API sees it once its token is verified."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    """The roles the API knows (other roles in a token are ignored)."""

    CUSTOMER = "customer"
    """Places orders for itself; reads, changes and cancels its own orders."""
    SUPPORT = "support"
    """Reads every order and its history; cancels any order."""
    INVENTORY = "inventory"
    """Registers products and adds stock."""
    ADMIN = "admin"
    """Everything, operations included."""


ALL_ROLES = frozenset(Role)


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    """The token's ``sub``: recorded as the actor of every event it causes."""
    roles: frozenset[Role]
    customer_id: str | None = None
    """The customer this caller is (customer role): the ``customer_id`` claim, else ``sub``."""

    def has_any(self, roles: frozenset[Role]) -> bool:
        return not self.roles.isdisjoint(roles)

    @property
    def roles_text(self) -> str:
        """The roles as stored in event metadata: space-separated, sorted (like OAuth scopes)."""
        return " ".join(sorted(self.roles))


ANONYMOUS = Principal(subject="anonymous", roles=ALL_ROLES)
"""The caller when auth is off (``ORDERSTREAM_AUTH=off``): may do everything."""
