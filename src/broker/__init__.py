"""Secrets broker: envelope-encrypted credentials released over mTLS to granted executors."""

__version__ = "0.1.0"
