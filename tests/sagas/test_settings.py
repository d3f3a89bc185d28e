"""The fulfilment saga's typed settings: read once from the environment, checked,
and handed on to a saga worker process unchanged."""

from __future__ import annotations

import pytest

from orderstream.config import ConfigError
from orderstream.sagas.fulfilment.settings import FulfilmentSettings, WorkerTuning
from orderstream.sagas.runtime import TemporalSettings


def test_defaults() -> None:
    settings = FulfilmentSettings.from_env({})
    assert settings.temporal == TemporalSettings()
    assert settings.temporal.address is None  # serve starts the dev server itself
    assert settings.task_queue == "orderstream-order-fulfilment"
    assert settings.payment_deadline_seconds == 900.0
    assert settings.max_in_flight == 64
    assert (settings.worker_processes, settings.trigger) == (0, True)
    assert settings.tuning == WorkerTuning()
    assert settings.nice == 10  # worker processes and the dev server below the API
    assert settings.temporal.ui_url(dev_server=True) == "http://localhost:8233"
    assert settings.temporal.ui_url(dev_server=False) is None


def test_environment_and_the_address_option() -> None:
    env = {
        "TEMPORAL_ADDRESS": "temporal:7233",
        "ORDERSTREAM_TEMPORAL_UI_URL": "http://ui.example:8080",
        "ORDERSTREAM_TEMPORAL_UI_PORT": "9233",
        "ORDERSTREAM_TASK_QUEUE": "q",
        "ORDERSTREAM_PAYMENT_DEADLINE": "2.5",
        "ORDERSTREAM_SAGA_IN_FLIGHT": "8",
        "ORDERSTREAM_SAGA_WORKER_PROCESSES": "2",
        "ORDERSTREAM_SAGA_TRIGGER": "off",
        "ORDERSTREAM_SAGA_WORKFLOW_TASKS": "4",
        "ORDERSTREAM_SAGA_SANDBOX": "on",
        "ORDERSTREAM_SAGA_NICE": "0",
    }
    settings = FulfilmentSettings.from_env(env, worker_processes=1)
    assert settings.temporal == TemporalSettings(
        address="temporal:7233", ui_port=9233, web_ui_url="http://ui.example:8080"
    )
    assert settings.temporal.ui_url(dev_server=True) == "http://ui.example:8080"
    assert (settings.task_queue, settings.payment_deadline_seconds, settings.max_in_flight) == ("q", 2.5, 8)
    assert (settings.worker_processes, settings.trigger) == (2, False)
    assert settings.tuning == WorkerTuning(max_concurrent_workflow_tasks=4, sandbox=True)
    assert settings.nice == 0
    assert FulfilmentSettings.from_env(env, temporal_address="other:7233").temporal.address == "other:7233"
    assert FulfilmentSettings.from_env({}, worker_processes=1).worker_processes == 1  # serve's default


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ORDERSTREAM_PAYMENT_DEADLINE", "soon"),
        ("ORDERSTREAM_PAYMENT_DEADLINE", "0"),
        ("ORDERSTREAM_SAGA_IN_FLIGHT", "0"),
        ("ORDERSTREAM_SAGA_WORKER_PROCESSES", "-1"),
        ("ORDERSTREAM_SAGA_TRIGGER", "maybe"),
        ("ORDERSTREAM_TEMPORAL_DEV_PORT", "x"),
        ("ORDERSTREAM_SAGA_NICE", "-5"),
        ("ORDERSTREAM_SAGA_NICE", "20"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        FulfilmentSettings.from_env({name: value})


def test_a_worker_process_reads_back_the_settings_it_was_given() -> None:
    settings = FulfilmentSettings(
        temporal=TemporalSettings(web_ui_url="http://ui.example"),
        task_queue="q",
        payment_deadline_seconds=1.5,
        max_in_flight=3,
        worker_processes=0,
        trigger=False,
        tuning=WorkerTuning(max_concurrent_local_activities=16, workflow_threads=2, sandbox=True),
        nice=3,
    )
    assert FulfilmentSettings.from_env(settings.to_env()) == settings
