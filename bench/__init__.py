"""Benchmarks for asgi-audit (run with ``python -m bench.NAME``)."""
