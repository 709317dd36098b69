"""Where a variant's time goes under one of the benchmark's loads: ``py-spy`` samples the
uvicorn process (and its shipper child) while ``hey`` drives it.

    python -m bench.http.profile --variant asgi-audit --load raw-open [--seconds 10]

Writes a flame graph (SVG; ``--format speedscope`` for speedscope.app) to
``bench/results/profile-<variant>-<load>.<ext>``, one frame stack per thread, and prints
the hottest functions. ``py-spy`` comes from PyPI (``pip install py-spy``); attaching to
a process needs ptrace rights (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.http.load import hey
from bench.http.run import DEFAULT_POSTGRES, RESULTS, SMALL_BODY, warm_up
from bench.http.server import serving
from bench.recording import order_json

LOADS = {  # name: (path, requests per second or None for closed loop, concurrency)
    "raw-open": ("/raw/echo", 100.0, 4),
    "raw-c8": ("/raw/echo", None, 8),
    "json-open": ("/json/echo", 4.0, 2),
    "json-c8": ("/json/echo", None, 8),
    "small-c8": ("/small", None, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="asgi-audit")
    parser.add_argument("--load", choices=sorted(LOADS), default="raw-open")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--format", choices=("flamegraph", "speedscope", "raw"), default="flamegraph"
    )
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    args = parser.parse_args()
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        sys.exit("py-spy not found; install it with: pip install py-spy")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    path, rate, concurrency = LOADS[args.load]
    extension = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[args.format]
    output = RESULTS / f"profile-{args.variant}-{args.load}.{extension}"
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="asgi-audit-profile-") as temporary:
        scratch = Path(temporary)
        body = scratch / "body.json"
        body.write_bytes(SMALL_BODY if path == "/small" else order_json(1 << 20))
        with serving(args.variant, scratch / "server", DEFAULT_POSTGRES) as server:
            warm_up(server, {"raw": body, "json": body})
            command = [spy, "record", "-p", str(server.process.pid), "-o", str(output)]
            command += ["-r", str(args.rate), "-f", args.format, "--subprocesses", "--threads"]
            command += ["-d", str(int(args.seconds) + 2)] + (["--gil"] if args.gil else [])
            spying = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            closed_rate = 3000 if path == "/small" else 50
            requests = int((rate or closed_rate) * args.seconds)
            sample = hey(server.url(path), body, requests, concurrency, args.seconds * 6, rate)
            out, _ = spying.communicate(timeout=args.seconds + 60)
    print(out.decode(errors="replace")[-2000:])
    print(f"load: {sample.metrics} {sample.notes}")
    print(f"profile written to {output}")


if __name__ == "__main__":
    main()
