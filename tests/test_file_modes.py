"""Nobody but the service's user can read the trail: every file the middleware, the
shipper and the CLI create is 0600 and every folder 0700, under the usual umask 022 (and
with none at all), across a real server's life."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from processes import ROOT, SIGTERM, Load, environment, serving, wait_for

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


def loose(root: Path) -> Iterator[str]:
    """Every path under ``root`` that group or others may use."""
    for folder, names, files in os.walk(root):
        for name in [*names, *files]:
            path = Path(folder) / name
            try:
                mode = stat.S_IMODE(path.lstat().st_mode)
            except FileNotFoundError:  # removed meanwhile (a delivered segment)
                continue
            if mode & 0o077:
                yield f"{path.relative_to(root)} {mode:o}"


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_every_file_is_private(tmp_path: Path, umask: int) -> None:
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    sink = f"sqlite:///{work / 'store' / 'audit.db'}"
    (work / "store").mkdir(mode=0o700)
    env = environment(
        ASGI_AUDIT_SINK=sink,
        ASGI_AUDIT_SPOOL=str(work / "spool"),
        ASGI_AUDIT_MEMORY_LIMIT="1KiB",  # every body spills to a file on its way
        ASGI_AUDIT_FSYNC="always",
    )
    previous = os.umask(umask)  # inherited by every process started below
    try:
        seen: list[str] = []
        with serving(env) as server:
            load = Load(server.url, total=60, threads=4, body_size=64 << 10)
            running = load.start()
            while running.is_alive():
                seen.extend(loose(work))  # spill files and segments exist only meanwhile
                running.join(0.05)
            assert wait_for(lambda: (work / "store" / "audit.db").exists())
            server.signal(SIGTERM)
            assert server.wait(60) in (0, -SIGTERM)
        assert len(load.completed) == 60
        exported = work / "export.jsonl"
        result = subprocess.run(
            [
                sys.executable,
                *("-m", "asgi_audit", "export", "--sink", sink, "--bodies", "-o"),
                exported,
            ],
            env=environment(),
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        status = subprocess.run(
            [sys.executable, *("-m", "asgi_audit", "spool", "status", "--spool"), work / "spool"],
            env=environment(),
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
    finally:
        os.umask(previous)
    assert exported.stat().st_size > 0
    assert sorted(set(seen)) == []
    assert list(loose(work)) == []
