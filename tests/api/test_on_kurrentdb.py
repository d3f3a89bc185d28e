"""The API's core flow on the KurrentDB event store (``event_store_url=kurrentdb://...``).

The tests are the API suite's own, collected here a second time with ``settings``
pointing the event store at a fresh KurrentDB protocol STAND-IN per test
(``tests/kurrentdb_standin``; marked ``kurrentdb_standin``: not proof against a real
server). A fresh server per test because the API tests reuse SKUs and keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from orderstream.config import Settings
from tests.api.test_idempotency_and_concurrency import (
    test_100_concurrent_patches_with_one_if_match,
    test_concurrent_retries_with_one_key_append_once,
    test_concurrent_writers_without_if_match,
    test_same_key_twice_returns_the_same_answer_and_appends_once,
    test_same_key_with_another_body_is_422,
)
from tests.api.test_order_flow import (
    test_cancel_twice_is_409_and_writes_nothing,
    test_register_product_and_add_stock,
    test_register_twice_is_409,
    test_the_design_flow,
    test_unknown_order_is_404_everywhere,
)
from tests.kurrentdb_standin import StandIn

pytestmark = pytest.mark.kurrentdb_standin

__all__ = [
    "test_100_concurrent_patches_with_one_if_match",
    "test_cancel_twice_is_409_and_writes_nothing",
    "test_concurrent_retries_with_one_key_append_once",
    "test_concurrent_writers_without_if_match",
    "test_register_product_and_add_stock",
    "test_register_twice_is_409",
    "test_same_key_twice_returns_the_same_answer_and_appends_once",
    "test_same_key_with_another_body_is_422",
    "test_the_design_flow",
    "test_unknown_order_is_404_everywhere",
]


@pytest.fixture
def standin_url() -> Iterator[str]:
    standin = StandIn().start()
    try:
        yield standin.uri
    finally:
        standin.stop()


@pytest.fixture
def settings(settings: Settings, standin_url: str) -> Settings:
    """The API suite's settings (its read store, and whatever else it sets), on KurrentDB."""
    return dataclasses.replace(settings, event_store_url=standin_url)
