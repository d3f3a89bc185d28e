"""The sagas: long-running processes on Temporal, started and signalled by events.

- :mod:`.runtime`: what any saga shares: the Temporal link (connect, with retry),
  the dev server started by the SDK (tests, benchmarks), the tracing interceptor,
  :class:`~.runtime.TemporalSettings`.
- :mod:`.dev_server`: the dev server ``serve`` starts and supervises.
- :mod:`.fulfilment`: the order-fulfilment saga, everything of it (trigger,
  payment gateway, routes, workflow, activities, worker, settings), registered
  by the composition root as one :class:`~.fulfilment.saga.FulfilmentSaga`.

The core (domain, application, stores, API, projections) never imports this
package (``[tool.importlinter]`` in pyproject.toml, tests/unit/test_architecture.py):
it knows a saga only as :class:`orderstream.container.Saga`. Keep this module
free of imports: the workflow sandbox imports it when it imports a workflow.
"""
