"""End-to-end HTTP benchmark: the same FastAPI app under uvicorn, with no auditing, with the
two widely copied logging recipes, and with asgi-audit; run with ``python -m bench.http``."""
