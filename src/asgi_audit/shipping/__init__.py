"""The shipping room: from the spool to a sink, at least once.

Owns the shipper (read past the checkpoint, settle records, deliver, retry, advance),
where it runs (a child process, a sidecar, a thread: ``runners``), and the durable path
the middleware uses when no recorder is given (``delivery``: the spool writer and its
shipper, started and stopped together).

May import the recording, capture and sinks rooms (sinks only through their protocols and
registry) and the shared modules; never the CLI. The child shipper is started as a
command (``python -m asgi_audit ship``), not imported.
"""
