"""The sagas' payload converter decodes what the SDK's default one decodes, the same way."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from orderstream.sagas.fulfilment.inputs import (
    Amount,
    AuthorisationResult,
    ConfirmSteps,
    FulfilmentInput,
    FulfilmentOutcome,
    Line,
    OrderArgs,
    OrderLines,
    PaymentArgs,
    PaymentSteps,
    ReserveSteps,
    SettleSteps,
    ShipSteps,
    StepRef,
    StockArgs,
)
from orderstream.sagas.payloads import SAGA_DATA_CONVERTER, DataclassJSONPayloadConverter

SDK = DataConverter.default.payload_converter
OURS = SAGA_DATA_CONVERTER.payload_converter
REF = StepRef("order-fulfilment-o1", "ship-order", "corr", "cause")
PAY = PaymentArgs(REF, "p1", "o1", Amount(1250, "EUR"), payment_method_id="pm_1")
ORDER = OrderArgs(REF, "o1", lines=[Line("MUG", 2), Line("CAP", 1)], payment_id="p1", tracking_number="T1")
SETTLE = SettleSteps(PAY, [StockArgs(REF, "o1", "MUG"), StockArgs(REF, "o1", "CAP")])

VALUES: list[Any] = [
    StockArgs(REF, "o1", "MUG", quantity=2),
    ORDER,
    SETTLE,
    # Every activity input that joins steps (nested dataclasses):
    ReserveSteps([StockArgs(REF, "o1", "MUG", quantity=2), StockArgs(REF, "o1", "CAP", quantity=1)], ORDER),
    PaymentSteps(PAY, PAY),
    ConfirmSteps(ORDER, ORDER),
    ShipSteps(ORDER, SETTLE),
    OrderLines([Line("MUG", 2)], Amount(2500, "EUR")),
    AuthorisationResult("declined", "insufficient funds"),
    FulfilmentOutcome("compensated", "payment declined", compensations=["void-payment"]),
    FulfilmentInput("o1", "p1", [Line("MUG", 2)], Amount(1250, "EUR"), "corr", "cause", "pm_1", 60.0, True),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_it_writes_the_sdk_bytes_and_reads_them_back_as_the_sdk_does(value: Any) -> None:
    payloads = SDK.to_payloads([value])
    assert OURS.to_payloads([value]) == payloads  # histories keep the same bytes
    ours = OURS.from_payloads(payloads, [type(value)])
    assert ours == SDK.from_payloads(payloads, [type(value)]) == [value]


def test_an_input_recorded_before_a_field_existed_takes_its_default() -> None:
    data = b'{"order_id":"o1","payment_id":"p1","lines":[{"sku":"MUG","quantity":1}],'
    data += b'"amount":{"amount":100,"currency":"EUR"},"correlation_id":"c","causation_id":"d",'
    data += b'"payment_deadline_seconds":60,"unknown_later_field":1}'
    payload = Payload(metadata={"encoding": b"json/plain"}, data=data)
    (decoded,) = OURS.from_payloads([payload], [FulfilmentInput])
    assert decoded == SDK.from_payloads([payload], [FulfilmentInput])[0]
    assert decoded.local_steps is False
    assert decoded.payment_method_id == ""


def test_a_payload_msgspec_refuses_fails_as_the_sdk_fails() -> None:
    payload = Payload(metadata={"encoding": b"json/plain"}, data=b'{"status":"maybe"}')
    with pytest.raises(TypeError, match="Failed converting field status") as sdk:
        SDK.from_payloads([payload], [AuthorisationResult])
    with pytest.raises(TypeError) as ours:
        OURS.from_payloads([payload], [AuthorisationResult])
    assert str(ours.value) == str(sdk.value)
    assert DataclassJSONPayloadConverter().from_payload(payload) == {"status": "maybe"}  # no type: JSON
