"""orderstream: an event-sourced CQRS order-fulfilment service."""

__version__ = "0.1.0"
