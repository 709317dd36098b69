"""The package's version, in a module of its own: the CLI and the exports name it without
importing the middleware the package's ``__init__`` exports."""

__version__ = "0.1.0"
