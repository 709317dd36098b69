"""``asgi-audit run module:app [uvicorn options]``: audit an app without touching its code.

The command is uvicorn's own (every option it has, ``--workers``, ``--uds``,
``--proxy-headers``, ``--root-path``, ``--reload``... parsed by uvicorn itself), pointed
at :func:`audited_app`, a factory that imports the app named on the command line (calling
it when ``--factory`` is given, as uvicorn would), and wraps it in
:class:`~asgi_audit.AuditMiddleware` configured from the ``ASGI_AUDIT_*`` environment and
the ``--config`` file. Each worker process calls the factory, so each has its own writer;
they share the spool (one stream per process) and its one shipper.

The target and the factory flag reach the workers in two environment variables of their
own (:data:`TARGET_VARIABLE`, :data:`FACTORY_VARIABLE`), outside ``ASGI_AUDIT_*``, whose
names the settings check.

For gunicorn with uvicorn's worker class, name the factory and the app as gunicorn's
call syntax allows::

    gunicorn -k uvicorn.workers.UvicornWorker "asgi_audit.cli.run:audited_app('shop:app')"
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from ..capture.settings import load_settings
from ..errors import ConfigError
from ..sinks import check_sink_url
from .main import main
from .terminal import printable

TARGET_VARIABLE = "_ASGI_AUDIT_RUN_APP"
FACTORY_VARIABLE = "_ASGI_AUDIT_RUN_FACTORY"
FACTORY = f"{__name__}:audited_app"


def audited_app(target: str | None = None) -> Any:
    """The app named by ``target`` (``module:attribute``; default: the one ``asgi-audit
    run`` named), wrapped in an :class:`~asgi_audit.AuditMiddleware` configured from the
    environment and the configuration file."""
    from uvicorn.importer import import_from_string

    from ..capture.middleware import AuditMiddleware

    factory = False
    if target is None:
        target = os.environ.get(TARGET_VARIABLE)
        factory = os.environ.get(FACTORY_VARIABLE) == "1"
        if not target:
            raise RuntimeError(f"{TARGET_VARIABLE} is not set: start this with asgi-audit run")
    app = import_from_string(target)
    if factory:
        app = app()
    return AuditMiddleware(app)


@main.command(
    "run",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.option(
    "--config",
    envvar="ASGI_AUDIT_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML file of settings and [[rule]] tables; env ASGI_AUDIT_CONFIG.",
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def run(config: str | None, arguments: tuple[str, ...]) -> None:
    """Serve module:app under uvicorn, audited: asgi-audit run [--config FILE] module:app
    [uvicorn options]. Every uvicorn option works as with `uvicorn module:app`."""
    if not arguments or arguments[0] in ("-h", "--help"):
        click.echo(run.get_help(click.get_current_context()))
        click.echo("\nuvicorn's options follow the app; `uvicorn --help` lists them.")
        return
    try:
        from uvicorn.main import main as uvicorn_main
    except ImportError as exc:
        raise click.ClickException("asgi-audit run needs uvicorn: pip install uvicorn") from exc
    target, options, factory = split_arguments(arguments)
    environment = dict(os.environ)
    if config is not None:
        environment["ASGI_AUDIT_CONFIG"] = config
    try:  # the settings fail here, in one line, rather than in every worker's traceback
        load_settings({}, environment, check_sink_url)
    except ConfigError as exc:
        raise click.ClickException(printable(str(exc))) from exc
    os.environ.update(
        {
            TARGET_VARIABLE: target,
            FACTORY_VARIABLE: "1" if factory else "0",
            **({"ASGI_AUDIT_CONFIG": config} if config is not None else {}),
        }
    )
    sys.exit(uvicorn_main.main(args=[FACTORY, "--factory", *options], prog_name="asgi-audit run"))


def split_arguments(arguments: Sequence[str]) -> tuple[str, list[str], bool]:
    """The app (the one argument that is not an option or an option's value), uvicorn's
    other options, and whether ``--factory`` was among them."""
    from uvicorn.main import main as uvicorn_main

    takes_value = {
        name
        for param in uvicorn_main.params
        if isinstance(param, click.Option) and not param.is_flag and not param.count
        for name in param.opts
    }
    target: str | None = None
    options: list[str] = []
    factory = False
    waiting = False
    for argument in arguments:
        if waiting:
            options.append(argument)
            waiting = False
        elif argument == "--factory":
            factory = True
        elif argument.startswith("-"):
            options.append(argument)
            waiting = argument in takes_value
        elif target is None:
            target = argument
        else:
            raise click.UsageError(f"one app only (got {target!r} and {argument!r})")
    if target is None or ":" not in target:
        raise click.UsageError("name the app as module:attribute, e.g. shop.main:app")
    return target, options, factory
