"""Benchmarks: the broker's Resolve against a bare grpc.aio echo server on the same mTLS setup.

Run with `make bench` (or `python -m bench`); see docs/PERFORMANCE.md.
"""
