"""ASGI apps that the process-level tests serve with a real uvicorn."""
