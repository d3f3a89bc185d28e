"""The fulfilment saga's settings, read once by the composition root and passed in.

Every variable the saga reads is here, parsed like :mod:`orderstream.config`'s
(a bad value is a :class:`~orderstream.config.ConfigError` naming the variable);
nothing below reads ``os.environ``. Temporal's own (``TEMPORAL_ADDRESS``, the dev
server's ports, the Web UI) are :class:`~orderstream.sagas.runtime.TemporalSettings`.

- ``ORDERSTREAM_TASK_QUEUE`` (``orderstream-order-fulfilment``): the task queue.
- ``ORDERSTREAM_PAYMENT_DEADLINE`` (``900``): seconds a pending payment may wait.
- ``ORDERSTREAM_SAGA_IN_FLIGHT`` (``64``): starts and signals the trigger has
  waiting on Temporal at once.
- ``ORDERSTREAM_SAGA_WORKER_PROCESSES`` (``0``; ``serve`` on 2+ cores: ``1``): 0, the
  worker runs in this process; N, in N processes of its own (``orderstream worker
  --worker-of <pid>``, :class:`~orderstream.sagas.fulfilment.saga.SagaWorkerProcess`).
- ``ORDERSTREAM_SAGA_TRIGGER`` (``on``): ``off``, no trigger in this process (what
  such a worker process is started with).
- ``ORDERSTREAM_SAGA_WORKFLOW_TASKS``, ``ORDERSTREAM_SAGA_LOCAL_STEPS``,
  ``ORDERSTREAM_SAGA_WORKFLOW_THREADS``, ``ORDERSTREAM_SAGA_SANDBOX``: the worker's
  tuning (:class:`WorkerTuning`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orderstream.config import ConfigError, env_float, env_int, env_switch
from orderstream.sagas.fulfilment.inputs import DEFAULT_PAYMENT_DEADLINE_SECONDS, DEFAULT_TASK_QUEUE
from orderstream.sagas.fulfilment.trigger import DEFAULT_MAX_IN_FLIGHT
from orderstream.sagas.runtime import TemporalSettings

MAX_CACHED_WORKFLOWS = 5000
"""Runs kept in memory between workflow tasks (the SDK's default is 1,000): a
burst of orders keeps more than that many sagas open, and an evicted run is
replayed from its history on its next task."""
WORKER_PROCESSES_ENV = "ORDERSTREAM_SAGA_WORKER_PROCESSES"
TRIGGER_ENV = "ORDERSTREAM_SAGA_TRIGGER"
DEFAULT_NICE = 10
"""Saga worker processes and the dev server run 10 nice steps below the API: under
overload CFS gives them about a tenth of a contended core's time beside a request-serving
process, and all of an idle one."""
MAX_NICE = 19


@dataclass(frozen=True)
class WorkerTuning:
    """The worker's concurrency knobs (``WorkerTuning.from_env``; measured with
    ``python -m bench.saga_cost``, see docs/sagas.md)."""

    max_concurrent_workflow_tasks: int | None = None
    """Workflow tasks (activations) in progress at once; ``None``: the SDK's default."""
    max_concurrent_local_activities: int | None = None
    """Local steps running at once; ``None``: the SDK's default."""
    workflow_threads: int | None = None
    """Threads that run workflow activations (``workflow_task_executor``);
    ``None``: the SDK's default, as many as ``max_concurrent_workflow_tasks``
    (or 500)."""
    max_cached_workflows: int = MAX_CACHED_WORKFLOWS
    sandbox: bool = False
    """Run workflows in the SDK's sandbox (:data:`~orderstream.sagas.fulfilment.worker.WORKFLOW_RUNNER`,
    ``ORDERSTREAM_SAGA_SANDBOX=on``) or not (:class:`UnsandboxedWorkflowRunner`,
    the default). Why off: with our workflow package passed through, the sandbox
    no longer stands between ``workflow.py`` and the real modules it imports (so
    it would not refuse ``datetime.now()`` there anyway), yet entering it costs
    about 20 % of the worker's CPU per saga: the SDK enters it for every payload
    of every activation to ask for a serialization context (``python -m
    bench.saga_cost --variant default --variant sandboxed``: 41 ms -> 33 ms per
    saga). Determinism is guarded by the replay tests, which replay recorded and
    fresh histories in the sandbox too (``tests/sagas``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerTuning:
        def number(name: str) -> int | None:
            value = env_int(env, name, 0, minimum=0)  # 0 or unset: the SDK's default
            return value or None

        return cls(
            max_concurrent_workflow_tasks=number("ORDERSTREAM_SAGA_WORKFLOW_TASKS"),
            max_concurrent_local_activities=number("ORDERSTREAM_SAGA_LOCAL_STEPS"),
            workflow_threads=number("ORDERSTREAM_SAGA_WORKFLOW_THREADS"),
            sandbox=env_switch(env, "ORDERSTREAM_SAGA_SANDBOX", False),
        )


@dataclass(frozen=True, kw_only=True)
class FulfilmentSettings:
    temporal: TemporalSettings = field(default_factory=TemporalSettings)
    task_queue: str = DEFAULT_TASK_QUEUE
    payment_deadline_seconds: float = DEFAULT_PAYMENT_DEADLINE_SECONDS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    worker_processes: int = 0
    """Worker processes of their own; 0: the worker runs in this process."""
    trigger: bool = True
    """Run the saga trigger in this process."""
    tuning: WorkerTuning = field(default_factory=lambda: WorkerTuning())
    nice: int = DEFAULT_NICE
    """How much lower the CPU priority of the worker processes and the embedded dev
    server is than the API's (``ORDERSTREAM_SAGA_NICE``; 0: the same)."""

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, temporal_address: str | None = None, worker_processes: int = 0
    ) -> FulfilmentSettings:
        """``temporal_address``: the ``--temporal-address`` option; ``worker_processes``:
        the default when ``ORDERSTREAM_SAGA_WORKER_PROCESSES`` is unset."""
        return cls(
            temporal=TemporalSettings.from_env(env, address=temporal_address),
            task_queue=env.get("ORDERSTREAM_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
            payment_deadline_seconds=env_float(
                env, "ORDERSTREAM_PAYMENT_DEADLINE", DEFAULT_PAYMENT_DEADLINE_SECONDS
            ),
            max_in_flight=env_int(env, "ORDERSTREAM_SAGA_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT),
            worker_processes=env_int(env, WORKER_PROCESSES_ENV, worker_processes, minimum=0),
            trigger=env_switch(env, TRIGGER_ENV, True),
            tuning=WorkerTuning.from_env(env),
            nice=_nice(env),
        )

    def to_env(self) -> dict[str, str]:
        """These settings as the variables :meth:`from_env` reads: what a saga worker
        process of ours is started with, so it runs with exactly our settings."""
        env = {
            "ORDERSTREAM_TASK_QUEUE": self.task_queue,
            "ORDERSTREAM_PAYMENT_DEADLINE": repr(self.payment_deadline_seconds),
            "ORDERSTREAM_SAGA_IN_FLIGHT": str(self.max_in_flight),
            WORKER_PROCESSES_ENV: str(self.worker_processes),
            TRIGGER_ENV: "on" if self.trigger else "off",
            "ORDERSTREAM_SAGA_SANDBOX": "on" if self.tuning.sandbox else "off",
            "ORDERSTREAM_SAGA_NICE": str(self.nice),
        }
        for name, value in (
            ("ORDERSTREAM_SAGA_WORKFLOW_TASKS", self.tuning.max_concurrent_workflow_tasks),
            ("ORDERSTREAM_SAGA_LOCAL_STEPS", self.tuning.max_concurrent_local_activities),
            ("ORDERSTREAM_SAGA_WORKFLOW_THREADS", self.tuning.workflow_threads),
        ):
            env[name] = str(value or 0)
        if self.temporal.web_ui_url:
            env["ORDERSTREAM_TEMPORAL_UI_URL"] = self.temporal.web_ui_url
        return env


def _nice(env: Mapping[str, str]) -> int:
    nice = env_int(env, "ORDERSTREAM_SAGA_NICE", DEFAULT_NICE, minimum=0)
    if nice > MAX_NICE:
        raise ConfigError(f"ORDERSTREAM_SAGA_NICE: at most {MAX_NICE} (a nice increment), got {nice}")
    return nice
