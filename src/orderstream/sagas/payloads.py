"""The sagas' payload decoding: the SDK's JSON, decoded into dataclasses by msgspec.

Every activity input, workflow input and activity result of a saga is a
dataclass (``fulfilment/inputs.py``). The SDK's default converter decodes one
with ``json.loads`` and then ``value_to_type``, which calls
``typing.get_type_hints`` on every dataclass of the value, nested ones included,
for every payload: 30-90 us for one step's arguments (150-250 us while their
annotations were strings), about 12 % of the worker's CPU per saga
(docs/sagas.md, "Cost per saga"). ``msgspec.json.decode(data, type=...)`` reads
the same JSON into the same dataclasses in a few microseconds.

Only decoding changes, and only into dataclasses: payloads are still written by
the SDK's own ``json/plain`` converter (same bytes in the histories, so recorded
runs replay and other clients and SDKs read them as before). A payload msgspec
refuses (a wrong type, a missing field) is handed to the SDK's converter, so it
fails (or, where the SDK is lenient, succeeds) exactly as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)


class DataclassJSONPayloadConverter(JSONPlainPayloadConverter):
    """``json/plain`` whose dataclass targets are decoded by msgspec."""

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        if type_hint is not None and dataclasses.is_dataclass(type_hint):
            try:
                return msgspec.json.decode(payload.data, type=type_hint)
            except msgspec.MsgspecError:
                pass  # the SDK's converter decides (and words the error)
        return super().from_payload(payload, type_hint)


class SagaPayloadConverter(CompositePayloadConverter):
    """The SDK's default converters, with :class:`DataclassJSONPayloadConverter`
    in place of its ``json/plain`` one (still last: it accepts any value)."""

    def __init__(self) -> None:
        converters = [
            DataclassJSONPayloadConverter() if isinstance(c, JSONPlainPayloadConverter) else c
            for c in DefaultPayloadConverter.default_encoding_payload_converters
        ]
        super().__init__(*converters)


SAGA_DATA_CONVERTER = dataclasses.replace(DataConverter.default, payload_converter_class=SagaPayloadConverter)
"""The SDK's default data converter with :class:`SagaPayloadConverter`."""


def with_saga_payloads(client: Client) -> Client:
    """``client`` (its connection, namespace, interceptors, codec) decoding with
    :class:`SagaPayloadConverter`: what a saga worker is built on."""
    config = client.config()
    config["data_converter"] = dataclasses.replace(
        config["data_converter"], payload_converter_class=SagaPayloadConverter
    )
    return Client(**config)
