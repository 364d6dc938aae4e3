"""Persistence: the `Store` protocol and its backends."""

from broker.store.base import Store

__all__ = ["Store"]
