"""Shipper: from the spool to the sink, at least once.

It reads every stream's frames past its durable checkpoint, does the per-body CPU work
the store needs (SHA-256 where the tap did not compute it), hands batches to the sink,
retries with exponential backoff and jitter while the sink is down, and moves the
checkpoint only after the sink has committed. Delivered segments are deleted; a dead
process's stream is adopted (torn tail cut off and reported), shipped, then removed.

It runs where it does not share the app's GIL: by default as a child process the
middleware starts (one per spool directory: the ``shipper.lock`` decides which), or as
``asgi-audit ship --spool DIR --sink URL`` in a sidecar container sharing the spool
volume; a thread mode stays for tests and small apps.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recording import packing
from ..recording.frames import Frame, SpooledRecord, Tail, decode_payload, read_frames
from ..recording.spool import Checkpoint, StreamDirectory, streams, try_lock, unlock
from ..sinks import Store, open_sink
from ..sinks.protocols import Sink
from ..sinks.record import StoredRecord

logger = logging.getLogger("asgi_audit.shipper")


EMPTY_STREAM_GRACE = 60.0
"""Seconds a stream directory without segments is left alone (its writer is starting)."""


class Stopped(Exception):
    """Shipping was asked to stop (deadline or stop event) before the sink took a batch."""


@dataclass
class ShipReport:
    """What one pass delivered and repaired."""

    delivered: int = 0
    batches: int = 0
    repaired_bytes: int = 0
    adopted: list[str] = field(default_factory=list)
    pending_streams: int = 0


def stored_record(spooled: SpooledRecord) -> StoredRecord:
    """Settle a spooled record: digests computed where the tap and the spool writer left
    them out; bodies left packed (``decode_payload(unpack=False)``) stay packed only."""
    meta = dict(spooled.meta)
    kept: list[bytes | None] = []
    for name, data, packed in (
        ("request_body", spooled.request, spooled.request_packed),
        ("response_body", spooled.response, spooled.response_packed),
    ):
        packed_only = packed is not None and not data  # a packed body is never empty
        kept.append(None if packed_only else data)
        body = meta.get(name)
        if body is None:
            continue
        body = dict(body)
        if not body.get("sha256"):
            plain = packing.decode(packed, "zstd") if packed_only else data
            body["sha256"] = _digest(body, plain or b"")
        meta[name] = body
    record = StoredRecord.from_metadata(meta, kept[0], kept[1])
    if record.request_body is not None:
        record.request_body.packed = spooled.request_packed
    if record.response_body is not None:
        record.response_body.packed = spooled.response_packed
    return record


def _digest(body: dict[str, Any], data: bytes) -> str:
    path = body.get("sent_path")
    if path:
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    hasher.update(block)
        except OSError:
            return ""
        return hasher.hexdigest()
    return hashlib.sha256(data).hexdigest()


class Shipper:
    """Delivers one spool directory to one sink."""

    def __init__(
        self,
        spool: str | os.PathLike[str],
        sink: Sink,
        *,
        batch_records: int = 500,
        batch_bytes: int = 32 << 20,
        keep_delivered: bool = False,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        self.root = Path(spool)
        self.sink = sink
        self.unpack = not getattr(sink, "keeps_packed", False)
        """Stores that keep packed bodies as they are get them packed only (Sink docs)."""
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.keep_delivered = keep_delivered
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.failures = 0
        self.delivered = 0

    def ship_once(
        self, *, deadline: float | None = None, stop: threading.Event | None = None
    ) -> ShipReport:
        """Deliver everything the spool holds now; raises :class:`Stopped` when the
        deadline passes (or ``stop`` is set) while the sink is down."""
        report = ShipReport()
        for stream in streams(self.root):
            self._ship_stream(stream, report, deadline, stop)
        return report

    def _ship_stream(
        self,
        stream: StreamDirectory,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        # A writer makes its directory, then locks it, then makes its first segment: a
        # young directory without segments is a writer starting, not a dead stream.
        try:
            if not stream.segments() and time.time() - stream.directory.stat().st_mtime < (
                EMPTY_STREAM_GRACE
            ):
                return
            # A dead stream's writer lock is held while it is repaired, shipped and
            # removed: a writer arriving meanwhile is refused, rather than having its
            # files deleted under it.
            adopted = try_lock(stream.directory / "writer.lock")
        except FileNotFoundError:  # removed meanwhile
            return
        try:
            self._ship_locked(stream, adopted is None, report, deadline, stop)
        finally:
            if adopted is not None:
                unlock(adopted)

    def _ship_locked(
        self,
        stream: StreamDirectory,
        alive: bool,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        checkpoint = stream.checkpoint()
        segments = stream.segments()
        batch: list[StoredRecord] = []
        size = 0
        position = checkpoint
        for index, segment in enumerate(segments):
            if checkpoint.segment and segment < checkpoint.segment:
                continue
            last = index == len(segments) - 1
            start = checkpoint.offset if segment == checkpoint.segment else 0
            for item in read_frames(stream.directory / segment, start):
                if isinstance(item, Frame):
                    for spooled in decode_payload(item.payload, unpack=self.unpack):
                        record = stored_record(spooled)
                        batch.append(record)
                        size += len(spooled.request_packed or spooled.request)
                        size += len(spooled.response_packed or spooled.response)
                    position = Checkpoint(segment, item.end, position.delivered)
                    if len(batch) >= self.batch_records or size >= self.batch_bytes:
                        position = self._deliver(stream, batch, position, report, deadline, stop)
                        batch, size = [], 0
                    continue
                assert isinstance(item, Tail)
                if item.reason != "end" and not (alive and last):  # a live writer's tail
                    # may be a frame still being written; anywhere else it is damage
                    report.repaired_bytes += stream.truncate(segment, item.offset, item.reason)
                position = Checkpoint(segment, item.offset, position.delivered)
        if batch:
            position = self._deliver(stream, batch, position, report, deadline, stop)
        elif position != checkpoint and position.segment:
            stream.save_checkpoint(position)
        self._clean(stream, alive, report)

    def _deliver(
        self,
        stream: StreamDirectory,
        batch: list[StoredRecord],
        position: Checkpoint,
        report: ShipReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> Checkpoint:
        delay = self.backoff_initial
        while True:
            try:
                self.sink.write_batch(batch)
                break
            except Exception as exc:
                self.failures += 1
                logger.warning(
                    "asgi-audit: sink refused %d records (%s); retrying in %.1fs",
                    len(batch),
                    exc,
                    delay,
                )
                pause = delay * random.uniform(0.5, 1.5)
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise Stopped from exc
                if stop is not None:
                    if stop.wait(pause):
                        raise Stopped from exc
                else:
                    time.sleep(pause)
                delay = min(delay * 2, self.backoff_max)
        delivered = Checkpoint(position.segment, position.offset, position.delivered + len(batch))
        stream.save_checkpoint(delivered)
        self.delivered += len(batch)
        report.delivered += len(batch)
        report.batches += 1
        return delivered

    def _clean(self, stream: StreamDirectory, alive: bool, report: ShipReport) -> None:
        """Delete delivered segments; remove a dead stream once it is fully delivered."""
        checkpoint = stream.checkpoint()
        segments = stream.segments()
        if not checkpoint.segment:
            if not alive and not segments:
                stream.remove()
            return
        done = [s for s in segments if s < checkpoint.segment]
        if not self.keep_delivered:
            for segment in done:
                stream.remove_segment(segment)
        remaining = [s for s in segments if s >= checkpoint.segment]
        fully = remaining == [checkpoint.segment] and (
            (stream.directory / checkpoint.segment).stat().st_size <= checkpoint.offset
        )
        if not alive and fully:
            report.adopted.append(stream.name)
            if not self.keep_delivered:
                stream.remove()
        elif remaining and not fully:
            report.pending_streams += 1

    def run(
        self, stop: threading.Event, *, poll: float = 0.2, on_pass: Callable[[], None] | None = None
    ) -> None:
        """Ship until ``stop`` is set, then make one last pass (the caller bounds it by
        stopping the sink or letting the process exit)."""
        while not stop.is_set():
            try:
                self.ship_once(stop=stop)
            except Stopped:
                break
            except Exception:
                self.failures += 1
                logger.warning("asgi-audit: shipping pass failed", exc_info=True)
            if on_pass is not None:
                on_pass()
            stop.wait(poll)


# -- running the shipper: lock, thread, child process, sidecar -------------------------------


class ShipperLock:
    """The ``shipper.lock`` of a spool: only its holder ships that spool."""

    def __init__(self, spool: str | os.PathLike[str]) -> None:
        self.path = Path(spool) / "shipper.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True  # held already: a second fd would fail and lose the first
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = try_lock(self.path)
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """True when another process (or another holder here) ships this spool."""
        if self._fd is not None:
            return False
        if not self.path.exists():
            return False
        fd = try_lock(self.path)
        if fd is None:
            return True
        unlock(fd)
        return False


class ShipperThread:
    """In-process shipping, for tests and small apps (shares the app's GIL)."""

    def __init__(self, spool: str | os.PathLike[str], sink: Sink, **options: Any) -> None:
        self.shipper = Shipper(spool, sink, **options)
        self.lock = ShipperLock(spool)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="asgi-audit-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.lock.acquire():
                try:
                    self.shipper.run(self._stop)
                finally:
                    self.lock.release()
                return
            self._stop.wait(0.5)

    def stop(self, deadline: float | None = None) -> bool:
        """Make a last pass bounded by ``deadline`` (monotonic time), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                return False  # still inside a pass (a slow sink): it releases the lock
        if self.lock.acquire():
            try:
                self.shipper.ship_once(deadline=deadline)
            except Stopped:
                return False
            finally:
                self.lock.release()
        return True


_CHILD = "import sys; from asgi_audit.shipping.shipper import main; sys.exit(main(sys.argv[1:]))"
"""The child's program (``-m asgi_audit.shipper`` would import the module twice)."""


class ShipperProcess:
    """The child process a middleware starts to ship its spool."""

    def __init__(self, spool: str | os.PathLike[str], sink_url: str) -> None:
        self.spool = str(spool)
        self.sink_url = sink_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if ShipperLock(self.spool).held_elsewhere():
            return  # a shipper (another worker's child, or a sidecar) is already there
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                "--spool",
                self.spool,
                "--sink",
                self.sink_url,
                "--parent",
                str(os.getpid()),
                "--stop-on-eof",
            ],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def stop(self, deadline: float) -> bool:
        """Ask the child for a last pass and wait for it until ``deadline``.

        The request is the end of the child's stdin, not SIGTERM: a signal arriving
        before the child has installed its handler (it was started moments ago) would kill
        it without its last pass, while an end of file waits until it is read."""
        process = self.process
        if process is None:
            return True
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
        finally:
            self.process = None
        return process.returncode == 0


def serve(
    spool: str,
    sink_url: str,
    *,
    parent: int | None = None,
    wait_for_lock: bool = True,
    drain_seconds: float = 20.0,
    once: bool = False,
    stop_on_eof: bool = False,
    keep_delivered: bool = False,
) -> int:
    """Ship a spool until told to stop (SIGTERM, SIGINT, or with ``stop_on_eof`` the end
    of stdin: how the parent of a child shipper asks, and what its death looks like).
    Returns the process exit code."""
    lock = ShipperLock(spool)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if stop_on_eof:

        def watch_stdin() -> None:
            # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a
            # buffered reader's lock aborts the interpreter at exit ("could not acquire
            # lock for <stdin> at interpreter shutdown").
            with contextlib.suppress(OSError):
                while os.read(0, 4096):
                    pass
            stop.set()

        threading.Thread(target=watch_stdin, name="asgi-audit-stdin", daemon=True).start()
    while not lock.acquire():
        if not wait_for_lock or stop.wait(1.0):
            return 0
    try:
        sink = _open_until_stopped(sink_url, stop, retry=not once)
    except Stopped:
        lock.release()
        return 3
    except Exception:
        lock.release()
        raise
    shipper = Shipper(spool, sink, keep_delivered=keep_delivered)
    try:
        if once:
            report = shipper.ship_once()
            logger.info("asgi-audit: delivered %d records", report.delivered)
            return 0

        def watch_parent() -> None:
            if parent is not None and os.getppid() != parent:
                stop.set()

        shipper.run(stop, on_pass=watch_parent)
        try:
            shipper.ship_once(deadline=time.monotonic() + drain_seconds)
        except Stopped:
            return 3
        return 0
    finally:
        sink.close()
        lock.release()


def _open_until_stopped(url: str, stop: threading.Event, *, retry: bool) -> Store:
    """Open the store; while it cannot be opened (a bucket not created yet, a database
    still starting, credentials being rotated), keep the spool and try again with backoff
    instead of exiting: records wait in the spool either way, and a shipper that exits
    would only be restarted to fail again."""
    delay = 1.0
    while True:
        try:
            return open_sink(url)
        except Exception as exc:
            if not retry:
                raise
            logger.warning(
                "asgi-audit: cannot open the store (%s); the spool keeps the records, "
                "retrying in %.0f s",
                exc,
                delay,
            )
            if stop.wait(delay):
                raise Stopped from exc
            delay = min(delay * 2, 60.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asgi_audit.shipper")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--parent", type=int)
    parser.add_argument("--drain-seconds", type=float, default=20.0)
    parser.add_argument("--stop-on-eof", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return serve(
        args.spool,
        args.sink,
        parent=args.parent,
        wait_for_lock=False,
        drain_seconds=args.drain_seconds,
        stop_on_eof=args.stop_on_eof,
    )


if __name__ == "__main__":
    sys.exit(main())
