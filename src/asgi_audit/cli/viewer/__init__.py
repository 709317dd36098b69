"""``asgi-audit serve``: a read-only web viewer of a sink.

An ASGI app of its own (Starlette, server-rendered Jinja2 pages, one small vendored
script) that reads a sink and never writes to it: the list with the filters of ``ls``,
one exchange in detail, raw and HAR downloads, a side-by-side diff of two exchanges and a
live tail. Everything it shows came from clients, so it is rendered as text (autoescaped,
control characters made visible, no inline script allowed by the CSP), and nothing
answers without the token (:mod:`.auth`).

The modules, in the order a request meets them:

* :mod:`.headers`: the security headers on every response;
* :mod:`.auth`: the token, the session cookie, the login form;
* :mod:`.app`: :func:`~.app.create_app`, the routes, the sink's lifetime;
* :mod:`.filters`: the list's filters and its paging cursor, as a sink ``Query``;
* :mod:`.pages` (list, detail, diff, tail pages) over :mod:`.bodies` (how a body is
  shown), :mod:`.integrity` (digests and the chain link) and :mod:`.comparison` (the
  diff);
* :mod:`.downloads` (raw bodies, HAR) and :mod:`.live` (the server-sent events);
* :mod:`.command`: the click command, which imports the rest (and Starlette, Jinja2,
  uvicorn) only when it runs, so ``asgi-audit --help`` needs none of them.

This package imports nothing on import: the CLI registers the command by importing
:mod:`.command`, which must stay light.
"""
