"""Read models: one module per projection.

A projection is pure: it declares its collection schema (name, version,
queried fields), the event types it handles, the document id an event belongs
to, and ``fold(document | None, event) -> document | None``. The runner in
``orderstream.application.projection_runner`` owns subscriptions, batching
and checkpoints.
"""
