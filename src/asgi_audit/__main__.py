"""``python -m asgi_audit``: the same command as ``asgi-audit``."""

from .cli.main import main

main(prog_name="asgi-audit")
