"""What the request-body checks of issue 12 (finding 6) cost per POST /orders body.

Figures, each beside its reference from the same run:

- strict decode of an ``OrderPlacement`` with the ISO country/currency enums and the
  text patterns, beside the same decode with the checks of before (``[A-Z]{2}``
  patterns, no text pattern): what the new field checks add;
- the duplicate-key check (:func:`orderstream.api.plumbing.refuse_duplicate_keys`) on
  a body without colons in its strings (the cheap gate answers) and on one with a
  colon (the standard library's parse runs), beside the strict decode itself.

    python -m bench.input_checks
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Annotated

import msgspec

from orderstream.api import schemas
from orderstream.api.plumbing import refuse_duplicate_keys
from tests.api.helpers import order_body

_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class _OldAddress(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: _Text
    line1: _Text
    city: _Text
    postal_code: Annotated[str, msgspec.Meta(min_length=1, max_length=20)]
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
    line2: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class _OldPlacement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    customer_id: schemas.CustomerId
    lines: schemas.Lines
    shipping_address: _OldAddress
    payment_method: schemas.PaymentMethod


def per_call_us(fn: Callable[[], object], number: int = 50_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    plain = msgspec.json.encode(order_body(("SKU-1", 2), ("SKU-2", 3)))
    colon = msgspec.json.encode(order_body(("SKU-1", 2), customer_id="crm:42"))
    new = msgspec.json.Decoder(schemas.OrderPlacement, strict=True)
    old = msgspec.json.Decoder(_OldPlacement, strict=True)
    reference = per_call_us(lambda: old.decode(plain))
    figures = {
        "strict decode, new field checks": per_call_us(lambda: new.decode(plain)),
        "duplicate-key check, no colon in strings": per_call_us(lambda: refuse_duplicate_keys(plain)),
        "duplicate-key check, a colon in a string": per_call_us(lambda: refuse_duplicate_keys(colon)),
    }
    print(f"order body {len(plain)} bytes; reference: strict decode, old checks {reference:.2f} us")
    for what, value in figures.items():
        print(f"{what:45s} {value:6.2f} us  ({value / reference:.2f}x the reference)")


if __name__ == "__main__":
    main()
