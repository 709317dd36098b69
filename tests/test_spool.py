"""Spool segments and stream directories: rotation, the writer lock, the checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asgi_audit.errors import SpoolError
from asgi_audit.recording.frames import Frame, Tail, decode_payload, encode_frame, read_frames
from asgi_audit.recording.spool import (
    Checkpoint,
    SegmentWriter,
    StreamDirectory,
    segment_name,
    spool_bytes,
    streams,
)


def frame(n: int, size: int = 10) -> tuple[bytes, bytes]:
    return encode_frame([({"n": n}, [bytes([n % 256]) * size], [])])


def numbers(path: Path) -> list[int]:
    """The ``n`` of every record in a segment, in order (the segment must end cleanly)."""
    found: list[int] = []
    for item in read_frames(path):
        if isinstance(item, Frame):
            found.extend(r.meta["n"] for r in decode_payload(item.payload))
        else:
            assert item.reason == "end"
    return found


def test_first_segment_and_lock_are_created_on_open(tmp_path: Path) -> None:
    """Opening a writer creates the stream directory, its lock and its first segment."""
    writer = SegmentWriter(tmp_path, "svc.1")
    writer.open()
    try:
        stream = StreamDirectory(tmp_path / "streams" / "svc.1")
        assert stream.segments() == [segment_name(1)]
        assert (stream.directory / "writer.lock").exists()
        assert [s.name for s in streams(tmp_path)] == ["svc.1"]
    finally:
        writer.close()


def test_rotation_by_size(tmp_path: Path) -> None:
    """A segment that reached segment_bytes is sealed; the next frame starts a new one."""
    header, payload = frame(0)
    size = len(header) + len(payload)
    writer = SegmentWriter(tmp_path, "s", segment_bytes=2 * size)
    writer.open()
    try:
        for n in range(5):
            writer.append(*frame(n))
    finally:
        writer.close()
    stream = StreamDirectory(tmp_path / "streams" / "s")
    names = stream.segments()
    assert names == [segment_name(i) for i in (1, 2, 3)]
    assert [numbers(stream.directory / name) for name in names] == [[0, 1], [2, 3], [4]]
    assert writer.bytes_written == 5 * size == spool_bytes(tmp_path)


def test_rotation_by_age(tmp_path: Path) -> None:
    """segment_age=0 gives each frame its own segment; a long age never rotates."""
    young = SegmentWriter(tmp_path, "young", segment_age=0.0)
    old = SegmentWriter(tmp_path, "old", segment_age=3600.0)
    for writer in (young, old):
        writer.open()
        try:
            for n in range(3):
                writer.append(*frame(n))
        finally:
            writer.close()
    young_stream = StreamDirectory(tmp_path / "streams" / "young")
    old_stream = StreamDirectory(tmp_path / "streams" / "old")
    assert [numbers(young_stream.directory / s) for s in young_stream.segments()] == [
        [0],
        [1],
        [2],
    ]
    assert [numbers(old_stream.directory / s) for s in old_stream.segments()] == [[0, 1, 2]]


def test_empty_segment_is_never_rotated(tmp_path: Path) -> None:
    """A frame bigger than segment_bytes goes into the current (empty) segment."""
    writer = SegmentWriter(tmp_path, "s", segment_bytes=1, segment_age=0.0)
    writer.open()
    try:
        writer.append(*frame(0, size=100))
    finally:
        writer.close()
    assert StreamDirectory(tmp_path / "streams" / "s").segments() == [segment_name(1)]


def test_second_writer_on_the_same_stream_is_refused(tmp_path: Path) -> None:
    """The writer lock excludes a second writer of one stream, until the first closes."""
    first = SegmentWriter(tmp_path, "s")
    first.open()
    try:
        with pytest.raises(SpoolError, match="already being written"):
            SegmentWriter(tmp_path, "s").open()
    finally:
        first.close()
    second = SegmentWriter(tmp_path, "s")
    second.open()
    second.close()


def test_reopened_stream_appends_after_its_old_segments(tmp_path: Path) -> None:
    """A reopened stream starts past its old segments, never after a torn tail."""
    first = SegmentWriter(tmp_path, "s")
    first.open()
    first.append(*frame(1))
    first.close()
    stream = StreamDirectory(tmp_path / "streams" / "s")
    [old] = stream.segments()
    with open(stream.directory / old, "ab") as handle:  # a crash mid-frame
        handle.write(b"".join(frame(2))[:7])
    second = SegmentWriter(tmp_path, "s")
    second.open()
    try:
        second.append(*frame(3))
    finally:
        second.close()
    assert stream.segments() == [old, segment_name(2)]
    assert numbers(stream.directory / segment_name(2)) == [3]
    *_, tail = read_frames(stream.directory / old)
    assert isinstance(tail, Tail) and tail.reason == "torn"


def test_writer_alive_follows_the_writer(tmp_path: Path) -> None:
    """writer_alive() is true while a writer holds the stream open and false after close."""
    stream = StreamDirectory(tmp_path / "streams" / "s")
    assert not stream.writer_alive()
    writer = SegmentWriter(tmp_path, "s")
    writer.open()
    try:
        assert stream.writer_alive()
        assert stream.writer_alive()  # checking does not take the lock away
    finally:
        writer.close()
    assert not stream.writer_alive()


_HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    """A stream whose writer process was SIGKILLed is no longer alive (flock dies with it)."""
    stream = StreamDirectory(tmp_path / "streams" / "s")
    stream.directory.mkdir(parents=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(stream.directory / "writer.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        assert stream.writer_alive()
        with pytest.raises(SpoolError):
            SegmentWriter(tmp_path, "s").open()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert child.stdout is not None
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert not stream.writer_alive()


def test_checkpoint_survives_reopen_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A saved checkpoint is read back by a fresh StreamDirectory; no checkpoint.tmp stays."""
    directory = tmp_path / "streams" / "s"
    directory.mkdir(parents=True)
    for index in (3, 4):
        (directory / segment_name(index)).write_bytes(bytes(2000))
    stream = StreamDirectory(directory)
    assert stream.checkpoint() == Checkpoint("", 0, 0)
    stream.save_checkpoint(Checkpoint(segment_name(3), 1234, 17))
    stream.save_checkpoint(Checkpoint(segment_name(4), 56, 20))
    assert StreamDirectory(directory).checkpoint() == Checkpoint(segment_name(4), 56, 20)
    assert sorted(os.listdir(directory)) == [segment_name(3), segment_name(4), "checkpoint"]


def test_checkpoint_write_failure_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while writing the new checkpoint leaves the previous one in force."""
    directory = tmp_path / "streams" / "s"
    directory.mkdir(parents=True)
    (directory / segment_name(1)).write_bytes(bytes(100))
    stream = StreamDirectory(directory)
    stream.save_checkpoint(Checkpoint(segment_name(1), 10, 1))

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        stream.save_checkpoint(Checkpoint(segment_name(2), 20, 2))
    monkeypatch.undo()
    assert StreamDirectory(directory).checkpoint() == Checkpoint(segment_name(1), 10, 1)


def test_truncate_cuts_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """truncate() cuts a segment at an offset, returns the bytes removed and warns."""
    writer = SegmentWriter(tmp_path, "s")
    writer.open()
    writer.append(*frame(1))
    writer.close()
    stream = StreamDirectory(tmp_path / "streams" / "s")
    [name] = stream.segments()
    path = stream.directory / name
    good = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"AAB1garbage")
    with caplog.at_level("WARNING", logger="asgi_audit.recording.spool"):
        assert stream.truncate(name, good, "torn") == len(b"AAB1garbage")
    assert path.stat().st_size == good
    assert "torn" in caplog.text and name in caplog.text


def test_remove_segment_and_stream(tmp_path: Path) -> None:
    """Delivered segments and dead streams can be removed; spool_bytes follows."""
    writer = SegmentWriter(tmp_path, "s", segment_age=0.0)
    writer.open()
    for n in range(3):
        writer.append(*frame(n))
    writer.close()
    stream = StreamDirectory(tmp_path / "streams" / "s")
    first, *rest = stream.segments()
    before = spool_bytes(tmp_path)
    removed = (stream.directory / first).stat().st_size
    stream.remove_segment(first)
    stream.remove_segment(first)  # already gone: fine
    assert stream.segments() == rest
    assert spool_bytes(tmp_path) == before - removed
    stream.remove()
    assert list(streams(tmp_path)) == []
    assert spool_bytes(tmp_path) == 0


def test_failed_append_leaves_no_fragment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing part-way (ENOSPC) is taken back, so a retry follows good frames."""
    writer = SegmentWriter(tmp_path, "s")
    writer.open()
    try:
        writer.append(*frame(1))
        real_write = os.write

        def short_writev(fd: int, buffers: list[bytes]) -> int:
            return real_write(fd, b"".join(buffers)[:7])

        def full(fd: int, data: object) -> int:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(os, "writev", short_writev)
            patch.setattr(os, "write", full)
            with pytest.raises(OSError, match="No space"):
                writer.append(*frame(2))
        writer.append(*frame(2))
    finally:
        writer.close()
    stream = StreamDirectory(tmp_path / "streams" / "s")
    assert [numbers(stream.directory / s) for s in stream.segments()] == [[1, 2]]
