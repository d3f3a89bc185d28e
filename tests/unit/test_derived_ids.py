"""Derived ids never change: stored events are recognised by them (idempotent append)."""

from __future__ import annotations

import random
import uuid

from orderstream.application.commands import IDEMPOTENCY_NAMESPACE, CommandContext, derived_event_id
from orderstream.application.ids import uuid5, uuid5_text


def test_uuid5_is_the_stdlib_s() -> None:
    rng = random.Random(7)
    alphabet = "abcXYZ019-_\x1f é€😀"
    names = ["", "a", "order-1\x1f0"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80))) for _ in range(2000)
    ]
    for namespace in (IDEMPOTENCY_NAMESPACE, uuid.NAMESPACE_URL, uuid.uuid4()):
        for name in names:
            ours = uuid5(namespace, name)
            assert ours == uuid.uuid5(namespace, name)
            assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))
            assert (ours.version, ours.variant) == (5, uuid.RFC_4122)


def test_a_derived_event_id_is_what_it_always_was() -> None:
    context = CommandContext(actor="alice", idempotency_key="k-1", request_hash="h1")
    assert derived_event_id(context, "order-1", 0) == uuid.UUID("5add7a9c-875f-5e82-8e80-ee4ffe2d3ff6")
