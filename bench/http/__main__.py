"""``python -m bench.http``: see ``bench.http.run``."""

from bench.http.run import main

main()
