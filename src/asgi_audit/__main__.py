"""``python -m asgi_audit``: the same command as ``asgi-audit``."""

from .cli import main

main(prog_name="asgi-audit")
