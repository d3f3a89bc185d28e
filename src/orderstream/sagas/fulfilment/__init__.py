"""The order-fulfilment saga: reserve stock, authorise payment, ship; compensate
on failure. See ``docs/sagas.md``.

- :mod:`.inputs`: the dataclasses that cross the Temporal boundary, ids, names
- :mod:`.workflow`: ``OrderFulfilment`` (deterministic; runs in the sandbox)
- :mod:`.activities`: one command through ``UseCases`` per activity
- :mod:`.client`: the status report behind ``GET /orders/{id}/fulfilment``
- :mod:`.worker`: a standalone worker process
"""
