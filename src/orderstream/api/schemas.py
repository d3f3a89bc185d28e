"""Request and response schemas of the HTTP API (the public contract).

Requests are decoded strictly (no type coercion) and refuse unknown fields at
every level; every field has limits, so the OpenAPI document is precise enough
for a generated client and for schema-based fuzzing. Responses are separate
Structs: the API never exposes domain types, so the domain can change without
changing the contract.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import iso4217
import msgspec
import pycountry
from msgspec import Meta

from orderstream.domain import inventory, orders

# Every pattern ends ``$(?![\s\S])``, not ``$``: msgspec and Litestar match with
# ``re.search``, where ``$`` also matches before a final newline, so "SKU-1\n" was
# accepted as a SKU (and "Red mug\n" as a name). The lookahead means "the true end"
# in Python's regex and in ECMA-262's alike, so the OpenAPI document keeps it.
ORDER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$(?![\s\S])"
"""An order id, as the path of every order route takes it."""
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$(?![\s\S])"
MAX_LINES = orders.MAX_LINES
MAX_QUANTITY = orders.MAX_QUANTITY
MAX_STOCK_ADD = inventory.MAX_STOCK_ADD
MAX_PAGE = 100

Sku = Annotated[
    str,
    Meta(
        pattern=SKU_PATTERN,
        min_length=1,
        max_length=64,
        description="Stock keeping unit: letters, digits, '.', '_' or '-', starting with a letter or digit.",
        examples=["SKU-RED-42"],
    ),
]
_NOT_IN_TEXT = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
"""Control characters (NUL included), the line and paragraph separators, and the
bidirectional embeddings, overrides and isolates (the right-to-left override among
them) that make a name display as something else."""
_INVISIBLE = (
    r"\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2060-\u2064"
    r"\u00ad\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
)
"""Characters that show nothing: allowed inside text, but not as its only content.
The zero-width joiners belong to some scripts and to emoji; the left-to-right and
right-to-left marks come with text copied from right-to-left scripts; variation
selectors follow emoji. The soft hyphen, the Hangul fillers, the blank Braille
pattern, the invisible operators and the interlinear annotation marks draw nothing,
so a name of them only would look empty. (Characters past U+FFFF, such as the tag
characters, are not in this list: the pattern is also the OpenAPI document's, where
an ECMA-262 pattern without the ``u`` flag cannot name them.)"""
TEXT_PATTERN = f"^[^{_NOT_IN_TEXT}]*[^\\s{_NOT_IN_TEXT}{_INVISIBLE}][^{_NOT_IN_TEXT}]*$(?![\\s\\S])"
"""Printable text with at least one visible character (not white space, not zero-width)."""
OPTIONAL_TEXT_PATTERN = f"^[^{_NOT_IN_TEXT}]*$(?![\\s\\S])"

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=TEXT_PATTERN, examples=["Red mug"])]
Text = Annotated[str, Meta(min_length=1, max_length=200, pattern=TEXT_PATTERN)]
OptionalText = Annotated[str, Meta(max_length=200, pattern=OPTIONAL_TEXT_PATTERN)]
CustomerId = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,99}$(?![\s\S])", max_length=100, examples=["cust-0001"]),
]
Amount = Annotated[int, Meta(ge=0, le=10**12, description="Integer minor units (cents).", examples=[1250])]
CURRENCY_CODES = tuple(sorted(c.code for c in iso4217.Currency if c.exponent is not None))
"""ISO 4217 currencies that have minor units (amounts are integer minor units): not
XXX (no currency), XTS (testing), the precious metals nor the units of account."""
COUNTRY_CODES = tuple(sorted(country.alpha_2 for country in pycountry.countries))
"""The officially assigned ISO 3166-1 alpha-2 codes."""
if TYPE_CHECKING:  # a Literal built from data is beyond mypy; at run time it is the enum
    CurrencyCode = str
    CountryCode = str
else:
    CurrencyCode = Literal[CURRENCY_CODES]
    CountryCode = Literal[COUNTRY_CODES]
Currency = Annotated[CurrencyCode, Meta(description="ISO 4217 code.", examples=["EUR"])]
Quantity = Annotated[int, Meta(ge=1, le=MAX_QUANTITY, description=f"1 to {MAX_QUANTITY} units.")]
StockQuantity = Annotated[int, Meta(ge=1, le=MAX_STOCK_ADD, description=f"1 to {MAX_STOCK_ADD} units.")]
Country = Annotated[CountryCode, Meta(description="ISO 3166-1 alpha-2.", examples=["NL"])]
PostalCode = Annotated[str, Meta(min_length=1, max_length=20, pattern=TEXT_PATTERN)]
PaymentToken = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        description="Sandbox tokens: tok_approve, tok_decline, tok_pending, tok_error.",
        examples=["tok_approve"],
    ),
]
Revision = Annotated[int, Meta(ge=0, description="Stream revision (0 = first event).")]
Position = Annotated[int, Meta(ge=0, description="Global commit position in the event store.")]

OrderStatus = Literal[
    "placed", "stock_reserved", "payment_authorised", "confirmed", "shipped", "rejected", "cancelled"
]


# ------------------------------------------------------------------------ shared shapes


class Money(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An amount of money: ``{"amount": <integer minor units>, "currency": "EUR"}``."""

    amount: Amount
    currency: Currency


class ShippingAddress(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: Text
    line1: Text
    city: Text
    postal_code: PostalCode
    country: Country
    line2: OptionalText | None = None


# The views a read answers with (MoneyView, AddressView, ProductView, OrderLineView,
# StatusChange, OrderView) are decoded by the thousand straight from the read store
# (ReadStore.query_as) and hold no reference cycles, so they are ``gc=False``: the garbage
# collector does not track them, and a page of them no longer sets off collections of the
# whole heap (bench.queries --cpu; docs/read-models.md).
class MoneyView(msgspec.Struct, frozen=True, gc=False):
    """:class:`Money` as stored: answers show what was accepted when it was written,
    even where the request checks have become stricter since."""

    amount: int
    currency: str


class AddressView(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """:class:`ShippingAddress` as stored (see :class:`MoneyView`)."""

    name: str
    line1: str
    city: str
    postal_code: str
    country: str
    line2: str | None = None


# ----------------------------------------------------------------------------- requests


class ProductRegistration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Sku
    name: Name
    price: Money


class StockAddition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    quantity: StockQuantity


class OrderLineRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Sku
    quantity: Quantity


Lines = Annotated[
    list[OrderLineRequest],
    Meta(min_length=1, max_length=MAX_LINES, description=f"1 to {MAX_LINES} lines, one per SKU."),
]


class PaymentMethod(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    token: PaymentToken


class OrderPlacement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    customer_id: CustomerId
    lines: Lines
    shipping_address: ShippingAddress
    payment_method: PaymentMethod


class OrderChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Give at least one of the two; the lines replace the order's lines as a whole."""

    shipping_address: ShippingAddress | None = None
    lines: Lines | None = None


# ---------------------------------------------------------------------------- responses


class WriteResult(msgspec.Struct, frozen=True):
    """The answer to every command. ``revision`` is also in the ``ETag`` header;
    pass ``position`` as ``min_position`` to read your own write."""

    id: str
    revision: Revision
    position: Position


class ProductView(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    sku: str
    name: str
    price: MoneyView
    on_hand: int
    reserved: int
    available: int
    revision: Revision


class ProductPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[ProductView]
    next_cursor: str | None


class OrderLineView(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    sku: str
    quantity: int
    unit_price: MoneyView
    subtotal: MoneyView | None = None


class StatusChange(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    status: OrderStatus
    at: datetime
    revision: Revision


class OrderView(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    id: str
    customer_id: str
    status: OrderStatus
    lines: list[OrderLineView]
    total: MoneyView
    shipping_address: AddressView
    revision: Revision
    placed_at: datetime
    updated_at: datetime
    position: Position
    """Commit position of the last event applied to this document."""
    payment_id: str | None = None
    tracking_number: str | None = None
    cancel_reason: str | None = None
    reject_reason: str | None = None
    status_history: list[StatusChange] = msgspec.field(default_factory=list)


class StatusFacets(msgspec.Struct, frozen=True):
    status: dict[str, int]
    """Number of matching orders per status (over all pages)."""


class OrderPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[OrderView]
    next_cursor: str | None
    facets: StatusFacets


class EventView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    schema_version: int
    revision: Revision
    position: Position
    recorded_at: datetime
    data: dict[str, Any]
    metadata: dict[str, Any]


class OrderEvents(msgspec.Struct, frozen=True, kw_only=True):
    events: list[EventView]


class OrderStateSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The write side's view of an order, folded from the event store."""

    status: OrderStatus
    customer_id: str
    lines: list[OrderLineView]
    total: MoneyView | None
    shipping_address: AddressView | None
    payment_id: str | None
    cancel_reason: str | None


class OrderStateView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    revision: Revision
    current_revision: Revision
    state: OrderStateSnapshot


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok"]


class ProjectionReadiness(msgspec.Struct, frozen=True, kw_only=True):
    version: int | None = None
    checkpoint: int | None = None
    """Every event at or below this commit position is applied."""
    head_position: int | None = None
    lag_events: int | None = None
    lag_seconds: float | None = None
    parked: int | None = None
    oldest_parked_position: int | None = None
    """The parked event that holds the projection back (replay or skip it)."""
    physical: str | None = None
    """The table/index the collection's alias points at."""
    state: str | None = None
    """``rebuilding`` (a lost read model filled again), ``parked``, ``catching up``, ``current``."""
    rebuild_progress: float | None = None
    """While ``rebuilding``: how far, from 0 to 1 (``checkpoint`` / ``refill_until``)."""
    refill_until: int | None = None
    error: str | None = None


class DevServerReadiness(msgspec.Struct, frozen=True, kw_only=True):
    """The Temporal dev server ``serve`` started and supervises (restarted whenever it exits)."""

    status: Literal["starting", "running", "restarting", "stopped"]
    pid: int | None = None
    restarts: int
    """Times it was started again after exiting on its own."""
    last_exit: str | None = None
    down_seconds: float | None = None


class TemporalReadiness(msgspec.Struct, frozen=True, kw_only=True):
    """This process's connection to Temporal (the sagas wait while it is missing)."""

    status: Literal["connected", "connecting", "unreachable"]
    """``unreachable``: connected before, but the server does not answer now (the
    clients reconnect by themselves when it does)."""
    address: str
    attempts: int | None = None
    """``connecting``: attempts so far (retried with back-off up to 30 s apart)."""
    last_error: str | None = None
    unreachable_seconds: float | None = None
    dev_server: DevServerReadiness | None = None
    """Only in the process that started the dev server (``serve`` without ``TEMPORAL_ADDRESS``)."""


class SagaReadiness(msgspec.Struct, frozen=True, kw_only=True):
    """How far the sagas trail the orders (reported; readiness does not depend on it)."""

    trigger_lag_events: int | None = None
    """Order and payment events the saga trigger has not handed to Temporal yet
    (in flight included): orders placed whose workflow has not started, cancels
    and payment results not signalled."""
    in_flight: int | None = None
    parked: int | None = None
    oldest_parked_position: int | None = None
    workflows_running: int | None = None
    """Fulfilment workflows still running (Temporal's visibility); ``None`` when
    this process has no Temporal client."""
    error: str | None = None
    temporal: TemporalReadiness | None = None
    """``None`` in a process not configured for Temporal."""


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ready", "rebuilding", "unavailable"]
    """``rebuilding``: the stores answer (200) but a lost read model is being filled
    again, so its queries miss documents until it is done (see ``projections``)."""
    event_store: Literal["ok", "unavailable"]
    read_store: Literal["ok", "unavailable"]
    head_position: int | None
    projections: dict[str, ProjectionReadiness]
    sagas: SagaReadiness | None = None
    """``None`` when no saga trigger ever ran against this event store."""
    auth: Literal["on", "off"] = "on"
    """``off``: ORDERSTREAM_AUTH=off, every caller may do everything (never in production)."""
    warning: str | None = None
