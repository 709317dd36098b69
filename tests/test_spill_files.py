"""Spill files on a real disk: private, swept after a crash, capped, and failing alone.

Spill files hold copies of request and response bodies, so they must be as private as the
spool, must not pile up when a process is killed (SIGKILL leaves no chance to clean up), must
not fill the disk, and a failed write must cost one body its bytes, never the exchange or the
other bodies. All of it happens on the spill worker: the event loop never touches the disk.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_audit import MemoryRecorder
from asgi_audit.capture import spill
from asgi_audit.capture.record import Body
from asgi_audit.capture.tap import BodyTap, OverLimit
from harness import (
    Client,
    ReplayApp,
    check_body,
    drain_worker,
    http_scope,
    middleware,
    request,
    response,
    run,
)

BATCH = 64 << 10
"""The batch a tap with a small memory limit hands to the spill worker."""
WORKER = "asgi-audit-spill"


def _spill_files(root: Path) -> list[Path]:
    return sorted(root.glob("asgi-audit-*.body")) + sorted(root.glob("*/asgi-audit-*.body"))


def _spilled(
    spill_dir: Path,
    data: bytes,
    *,
    over_limit: OverLimit = "truncate",
    spill_limit: int | None = None,
) -> Body:
    """``data`` through a tap that spills everything, in batches of BATCH bytes."""
    tap = BodyTap(
        memory_limit=0,
        body_limit=None,
        over_limit=over_limit,
        spill_dir=str(spill_dir),
        spill_limit=spill_limit,
    )
    for start in range(0, len(data), BATCH):
        tap.feed(data[start : start + BATCH])
    body = tap.close(complete=True)
    assert body is not None
    body.sha256()  # the worker has run the final batch: the body's flags are final
    return body


def _error(body: Body) -> str | None:
    assert body._job is not None
    return body._job.error


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- private, whatever the umask ----------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_spill_files_and_folders_are_private_whatever_the_umask(umask: int, tmp_path: Path) -> None:
    """Folders made for spilling are 0700 and spill files and locks 0600, under any umask;
    an existing spill directory open to others is narrowed to 0700."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    previous = os.umask(umask)
    try:
        made = _spilled(tmp_path / "spool" / "spill", os.urandom(BATCH))
        narrowed = _spilled(loose, os.urandom(BATCH))
        paths = [Path(p) for p in (made.spill_path, narrowed.spill_path) if p is not None]
    finally:
        os.umask(previous)
    assert len(paths) == 2
    try:
        folders = [tmp_path / "spool", tmp_path / "spool" / "spill", loose]
        folders += [path.parent for path in paths]
        assert {str(f): oct(_mode(f)) for f in folders} == {str(f): "0o700" for f in folders}
        files = paths + [path.parent / spill.LOCK_NAME for path in paths]
        assert {str(f): oct(_mode(f)) for f in files} == {str(f): "0o600" for f in files}
    finally:
        made.discard()
        narrowed.discard()


def test_a_shared_temp_directory_keeps_its_mode(tmp_path: Path) -> None:
    """A sticky, world-writable spill_dir (like /tmp) is left as it is: only the process's
    own folder in it is made private."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    body = _spilled(shared, os.urandom(BATCH))
    try:
        assert body.spill_path is not None
        assert _mode(shared) == 0o1777
        assert _mode(Path(body.spill_path).parent) == 0o700
    finally:
        body.discard()


# --- swept after SIGKILL ------------------------------------------------------------------

_SPILL_AND_WAIT = textwrap.dedent(
    """
    import os, sys, time
    from asgi_audit.capture.tap import BodyTap

    tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=sys.argv[1])
    tap.feed(os.urandom(200_000))
    body = tap.close(complete=True)
    print(body.spill_path, flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def spilling_process() -> Iterator[Callable[[Path], tuple[subprocess.Popen[str], Path]]]:
    """Start processes that spill one body into a directory and wait; each is killed by
    its PID at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(spill_dir: Path) -> tuple[subprocess.Popen[str], Path]:
        process = subprocess.Popen(
            [sys.executable, "-c", _SPILL_AND_WAIT, str(spill_dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line, "the spilling process printed no path"
        return process, Path(line)

    yield start
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.timeout(60)
def test_the_folder_of_a_killed_process_is_swept_at_the_next_start(
    tmp_path: Path,
    spilling_process: Callable[[Path], tuple[subprocess.Popen[str], Path]],
) -> None:
    """SIGKILL leaves a process's spill folder behind; the next process to spill there
    removes it (its lock is free), and stray spill files of older versions, but keeps the
    folder of a live process and any folder that is not made of spill files."""
    killed, killed_file = spilling_process(tmp_path)
    alive, alive_file = spilling_process(tmp_path)
    assert killed_file.parent.parent == alive_file.parent.parent == tmp_path
    assert killed_file.parent.name.startswith(f"{killed.pid}.")
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    assert killed_file.exists()  # SIGKILL: nobody cleaned up

    unlocked = tmp_path / "1.2"  # a folder whose lock nobody holds
    unlocked.mkdir()
    (unlocked / spill.LOCK_NAME).touch()
    (unlocked / "asgi-audit-x.body").write_bytes(b"old")
    stray = tmp_path / "asgi-audit-stray.body"  # what versions before folders left
    stray.write_bytes(b"old")
    look_alike = tmp_path / "3.4"  # named like a folder, but not made of spill files
    look_alike.mkdir()
    (look_alike / "notes.txt").write_text("keep me")
    swept_before = spill.counts.swept

    body = _spilled(tmp_path, os.urandom(BATCH))  # this process's first use of tmp_path
    try:
        assert not killed_file.parent.exists()
        assert not unlocked.exists()
        assert not stray.exists()
        assert alive_file.exists() and alive.poll() is None
        assert (look_alike / "notes.txt").exists()
        assert spill.counts.swept - swept_before == 3
        assert body.spill_path is not None
        mine = Path(body.spill_path).parent
        assert mine.name.startswith(f"{os.getpid()}.")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["3.4", alive_file.parent.name, mine.name]
        )
    finally:
        body.discard()


# --- spill_limit --------------------------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which once-per-process warnings this process gave already."""
    monkeypatch.setattr(spill, "_warned", set())


@pytest.mark.parametrize("over_limit", ["truncate", "skip_body"])
@pytest.mark.usefixtures("fresh_warnings")
def test_spill_limit_applies_over_limit_with_exact_size_and_digest(
    over_limit: OverLimit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past spill_limit a body stops being stored: truncated keeps what was stored,
    skip_body keeps nothing; both keep the true size and SHA-256; one warning per process;
    a discarded body gives its bytes back."""
    drain_worker()
    held = spill.held_bytes()
    limit = held + 2 * BATCH + 100
    over_before = spill.counts.over_limit
    data, again = os.urandom(5 * BATCH), os.urandom(3 * BATCH)
    with caplog.at_level(logging.WARNING, logger="asgi_audit"):
        body = _spilled(tmp_path, data, over_limit=over_limit, spill_limit=limit)
        second = _spilled(tmp_path, again, over_limit=over_limit, spill_limit=limit)
    try:
        for one, whole in ((body, data), (second, again)):
            assert one.size == len(whole)
            assert one.sha256() == hashlib.sha256(whole).hexdigest()
            assert _error(one) == spill.SPILL_LIMIT_REACHED
        if over_limit == "truncate":
            assert (body.truncated, body.skipped) == (True, False)
            assert body.read() == data[: 2 * BATCH]
            assert body.stored_size == 2 * BATCH
            assert (second.truncated, second.read()) == (True, b"")  # the first holds all
            assert spill.held_bytes() == held + 2 * BATCH
        else:
            assert (body.truncated, body.skipped) == (False, True)
            assert (body.read(), body.stored_size, body.spill_path) == (b"", 0, None)
            assert second.skipped
            assert spill.held_bytes() == held
        assert spill.counts.over_limit - over_before == 2
        warnings = [r for r in caplog.records if r.name == "asgi_audit"]
        assert len(warnings) == 1 and "spill_limit" in warnings[0].getMessage()
    finally:
        body.discard()
        second.discard()
    assert spill.held_bytes() == held
    third = _spilled(tmp_path, again, over_limit=over_limit, spill_limit=limit)
    try:
        check_body(third, again, body_limit=2 * BATCH, over_limit=over_limit)
    finally:
        third.discard()
    assert _spill_files(tmp_path) == []


def test_automatic_spill_limit_is_a_quarter_of_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spill_limit=None allows a quarter of the spill folder's free space, measured on the
    worker thread when the first body spills."""
    drain_worker()
    held = spill.held_bytes()
    measured: list[str] = []
    real_statvfs = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        measured.append(threading.current_thread().name)
        real = real_statvfs(path)
        free = 4 * (3 * BATCH) + 3 * held  # (free + held) // 4 == held + 3 * BATCH
        return os.statvfs_result((real.f_bsize, 1, real.f_blocks, free, free, *real[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    data = os.urandom(5 * BATCH)
    body = _spilled(tmp_path, data, spill_limit=None)
    try:
        assert measured and all(name.startswith(WORKER) for name in measured)
        assert body.truncated and _error(body) == spill.SPILL_LIMIT_REACHED
        assert body.read() == data[: 3 * BATCH]
        assert body.sha256() == hashlib.sha256(data).hexdigest()
    finally:
        body.discard()


# --- a failing write costs one body ---------------------------------------------------------


@pytest.mark.usefixtures("fresh_warnings")
def test_a_failed_write_costs_only_that_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on one body's spill file drops that body's bytes (its size and digest stay
    exact, its partial file goes); bodies spilled in the same period are intact."""
    real_writev = os.writev
    writers: set[str] = set()
    calls: list[int] = []  # the first is A's: the worker spills A, B, C as they came

    def writev(fd: int, parts: list[bytes]) -> int:
        writers.add(threading.current_thread().name)
        calls.append(fd)
        if len(calls) == 1:  # (A stores nothing more after it fails: no second call)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, parts)

    monkeypatch.setattr(os, "writev", writev)
    failed_before = spill.counts.failed
    data = {name: name * (3 * BATCH) for name in (b"A", b"B", b"C")}
    taps = {
        name: BodyTap(memory_limit=0, body_limit=None, spill_dir=str(tmp_path)) for name in data
    }
    for start in range(0, 3 * BATCH, BATCH):  # interleaved, as concurrent exchanges
        for name, tap in taps.items():
            tap.feed(data[name][start : start + BATCH])
    bodies = {name: tap.close(complete=True) for name, tap in taps.items()}
    try:
        failed = bodies[b"A"]
        assert failed is not None
        assert failed.sha256() == hashlib.sha256(data[b"A"]).hexdigest()
        assert (failed.size, failed.skipped, failed.read()) == (3 * BATCH, True, b"")
        error = _error(failed)
        assert error is not None and error.startswith("ENOSPC")
        for name in (b"B", b"C"):
            intact = bodies[name]
            assert intact is not None
            check_body(intact, data[name])
            assert _error(intact) is None
        assert len(_spill_files(tmp_path)) == 2  # the failed body's file is gone
        assert spill.counts.failed - failed_before == 1
        assert writers == {f"{WORKER}_0"}
    finally:
        for body in bodies.values():
            if body is not None:
                body.discard()
    assert _spill_files(tmp_path) == []


def test_no_file_descriptor_for_a_spill_file_costs_only_that_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE when making a spill file: that body is kept without bytes, the next is whole."""
    real_mkstemp = tempfile.mkstemp
    calls = 0

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    first, second = os.urandom(2 * BATCH), os.urandom(2 * BATCH)
    lost, kept = _spilled(tmp_path, first), _spilled(tmp_path, second)
    try:
        assert lost.skipped and (_error(lost) or "").startswith("EMFILE")
        assert lost.sha256() == hashlib.sha256(first).hexdigest()
        check_body(kept, second)
    finally:
        lost.discard()
        kept.discard()


# --- nothing on the event loop ---------------------------------------------------------------

_DISK_EVENTS = frozenset(
    {
        "open",
        "os.mkdir",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.chmod",
        "os.scandir",
        "os.listdir",
        "shutil.rmtree",
        "tempfile.mkstemp",
        "tempfile.mkdtemp",
        "fcntl.flock",
    }
)


class _DiskWatch:
    """Disk operations under one directory (and every ``flock``), with the thread that made
    them and whether that thread was running an event loop. Fed by an audit hook, which
    cannot be removed: it stays installed, idle, once a test has used it."""

    installed: _DiskWatch | None = None

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.active = False
        self.seen: list[tuple[str, str, bool]] = []

    @classmethod
    def on(cls, root: Path) -> _DiskWatch:
        watch = cls(root)
        if cls.installed is None:
            sys.addaudithook(_audit)
        cls.installed = watch
        watch.active = True
        return watch

    def note(self, event: str) -> None:
        self.seen.append((event, threading.current_thread().name, _on_loop()))


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _audit(event: str, args: tuple[Any, ...]) -> None:
    watch = _DiskWatch.installed
    if watch is None or not watch.active or event not in _DISK_EVENTS:
        return
    if event == "fcntl.flock" or (args and os.fsdecode(str(args[0])).startswith(watch.root)):
        watch.note(event)


@pytest.mark.timeout(60)
def test_the_event_loop_never_touches_the_spill_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making the folder, sweeping, writing, measuring, and removing the files of a dropped
    exchange or of a body discarded on the loop all happen on the spill worker, never on
    the thread running the event loop."""
    spill_dir = tmp_path / "spill"
    dead = spill_dir / "1.2"
    dead.mkdir(parents=True)
    (dead / spill.LOCK_NAME).touch()
    watch = _DiskWatch.on(spill_dir)
    for name in ("writev", "statvfs", "fchmod"):
        real = getattr(os, name)

        def wrapped(*args: Any, _real: Any = real, _name: str = name) -> Any:
            watch.note(_name)
            return _real(*args)

        monkeypatch.setattr(os, name, wrapped)
    recorder = MemoryRecorder(max_records=1)
    chunk = os.urandom(BATCH)
    app = ReplayApp(response(chunk, chunk))
    audited = middleware(app, recorder, overflow="drop", memory_limit=0, spill_dir=spill_dir)

    async def discard_on_the_loop() -> None:
        tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=str(spill_dir))
        tap.feed(chunk)
        body = tap.close(complete=True)
        assert body is not None and body._job is not None and body._job.last is not None
        await asyncio.wrap_future(body._job.last)  # done: Body.discard calls the job at once
        body.discard()

    try:
        run(audited, http_scope(), Client(request(chunk, chunk)))  # recorded
        run(audited, http_scope(), Client(request(chunk, chunk)))  # dropped: recorder full
        asyncio.run(discard_on_the_loop())
        drain_worker()
    finally:
        watch.active = False
    assert audited.dropped == 1
    [kept] = recorder.take_all()
    try:
        check_body(kept.request_body, chunk * 2)
        check_body(kept.response_body, chunk * 2)
        assert len(_spill_files(spill_dir)) == 2  # the dropped exchange's files are gone
    finally:
        kept.discard()
    assert not dead.exists()
    on_loop = [seen for seen in watch.seen if seen[2]]
    assert on_loop == []
    events = {event for event, thread, _ in watch.seen if thread.startswith(WORKER)}
    assert {"os.scandir", "tempfile.mkdtemp", "fcntl.flock", "tempfile.mkstemp"} <= events
    assert {"writev", "statvfs", "os.remove"} <= events


def test_spill_files_hold_no_body_in_clear(tmp_path: Path) -> None:
    """A body waiting in a spill file for the writer (which redacts it) is encrypted with
    a key only this process holds; it reads back exactly."""
    secret = b'{"password": "hunter2-in-a-spill-file"}' * (BATCH // 16)
    tap = BodyTap(memory_limit=0, body_limit=None, spill_dir=str(tmp_path))
    for start in range(0, len(secret), BATCH):
        tap.feed(secret[start : start + BATCH])
    body = tap.close(complete=True)
    assert body is not None
    try:
        assert body.read() == secret
        [path] = _spill_files(tmp_path)
        raw = path.read_bytes()
        assert len(raw) == len(secret) and b"hunter2" not in raw
    finally:
        body.discard()
