"""The capture room: what happens on the request path.

Owns the middleware and the per-exchange capture (decide, tap, hand off), the body taps
and their spill worker, the policy (rules, levels, route templates, ``@audited`` markers),
the settings, and the record of one exchange (``Exchange``, ``Body``, ``Identity``).

May import only the package's shared modules (``errors``, ``_types``, ``_forks``) and
itself, except through the documented hand-off: the middleware calls a
``recording.handoff.Recorder`` and, when none is given, builds the durable one through
``shipping.delivery``. It never imports a sink (an import-linter contract says so), so
building the middleware loads no database driver.
"""
