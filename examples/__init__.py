"""Example apps for ``asgi-audit run`` (``asgi-audit run examples.shop:app``)."""
