"""Spool frames, version 2: what damage costs. A damaged frame in the middle of a segment
costs that frame only: the reader reports the damaged range and goes on with the next good
frame. Version 1 (``AAB1``) segments, written before an upgrade, are still read."""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
import tracemalloc
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_audit.recording import frames
from asgi_audit.recording.frames import (
    FRAME_HEADER,
    LEGACY_FRAME_HEADER,
    LEGACY_MAGIC,
    MAGIC,
    Damage,
    Frame,
    Tail,
    decode_payload,
    encode_frame,
    frame_crc,
    frame_header,
    read_frames,
)

Draft = tuple[dict[str, Any], list[bytes], list[bytes]]
Item = Frame | Damage | Tail

drafts = st.tuples(
    st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.lists(st.binary(max_size=60), max_size=3),
    st.lists(st.binary(max_size=60), max_size=3),
)
batches_of_frames = st.lists(st.lists(drafts, max_size=3), min_size=1, max_size=6)


@dataclass
class Segment:
    """Frames laid out in one file: their bytes, and where each one is."""

    data: bytes
    spans: list[tuple[int, int]]
    payloads: list[bytes]


def segment_of(batches: list[list[Draft]]) -> Segment:
    data = b""
    spans: list[tuple[int, int]] = []
    payloads: list[bytes] = []
    for batch in batches:
        header, payload = encode_frame(batch)
        spans.append((len(data), len(data) + len(header) + len(payload)))
        payloads.append(payload)
        data += header + payload
    return Segment(data, spans, payloads)


def read_bytes(data: bytes, offset: int = 0) -> list[Item]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "1.seg"
        path.write_bytes(data)
        return list(read_frames(path, offset))


def changed_ranges(before: bytes, after: bytes) -> list[tuple[int, int]]:
    """The stretch of ``after`` that differs from ``before`` (same length), if any."""
    differing = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    return [(differing[0], differing[-1] + 1)] if differing else []


def check(
    items: list[Item],
    size: int,
    untouched: list[tuple[int, bytes]],
    changed: list[tuple[int, int]],
) -> None:
    """The reading covers the file without gaps or overlaps; exactly the ``untouched``
    frames (offset, payload) come back; the ``changed`` bytes lie in what is reported as
    damage (a Damage, or a tail other than a clean end, which reaches the end of file)."""
    *body, tail = items
    assert isinstance(tail, Tail)
    position = 0
    reported: list[tuple[int, int]] = []
    for item in body:
        assert isinstance(item, Frame | Damage), item
        assert item.offset == position and item.end > item.offset, (item, position)
        if isinstance(item, Damage):
            reported.append((item.offset, item.end))
        position = item.end
    assert tail.offset == position
    if tail.reason == "end":
        assert position == size
    else:
        assert tail.reason in ("torn", "corrupt")
        reported.append((tail.offset, size))
    assert [(f.offset, f.payload) for f in body if isinstance(f, Frame)] == untouched
    for start, end in changed:
        for byte in range(start, end):
            assert any(a <= byte < b for a, b in reported), (byte, reported)
    # consecutive damage is reported as one stretch
    assert not any(
        isinstance(a, Damage) and isinstance(b, Damage) for a, b in itertools.pairwise(body)
    )


def untouched_frames(
    segment: Segment, changed: list[tuple[int, int]], shift_from: int = -1, shift: int = 0
) -> list[tuple[int, bytes]]:
    """Frames no changed byte falls in, at their offsets in the damaged file (frames from
    ``shift_from`` on moved by ``shift`` bytes: an insertion)."""
    kept = []
    for (start, end), payload in zip(segment.spans, segment.payloads, strict=True):
        if any(start < b and a < end for a, b in changed):
            continue
        kept.append((start + shift if start >= shift_from >= 0 else start, payload))
    return kept


@settings(deadline=None, max_examples=150)
@given(batches=batches_of_frames, data=st.data())
def test_a_flipped_byte_costs_only_its_frame(batches: list[list[Draft]], data: Any) -> None:
    """Any one byte changed anywhere: every other frame is read back exactly, and the
    reported damage covers the byte."""
    segment = segment_of(batches)
    position = data.draw(st.integers(0, len(segment.data) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="flip")
    damaged = bytearray(segment.data)
    damaged[position] ^= flip
    changed = [(position, position + 1)]
    items = read_bytes(bytes(damaged))
    check(items, len(damaged), untouched_frames(segment, changed), changed)


@settings(deadline=None, max_examples=150)
@given(batches=batches_of_frames, data=st.data())
def test_an_overwritten_range_costs_only_the_frames_it_touches(
    batches: list[list[Draft]], data: Any
) -> None:
    """A stretch overwritten with anything (zeros, noise, a copy of a header): the frames
    it does not reach are read back exactly, and the damage reported covers it."""
    segment = segment_of(batches)
    size = len(segment.data)
    start = data.draw(st.integers(0, size - 1), label="start")
    length = data.draw(st.integers(1, min(300, size - start)), label="length")
    noise = data.draw(
        st.one_of(
            st.binary(min_size=length, max_size=length),
            st.just(bytes(length)),
            st.just((MAGIC * length)[:length]),
        ),
        label="noise",
    )
    damaged = segment.data[:start] + noise + segment.data[start + length :]
    changed = changed_ranges(segment.data, damaged)
    items = read_bytes(damaged)
    check(items, len(damaged), untouched_frames(segment, changed), changed)


@settings(deadline=None, max_examples=150)
@given(batches=batches_of_frames, data=st.data())
def test_garbage_inserted_between_frames_costs_no_frame(
    batches: list[list[Draft]], data: Any
) -> None:
    """Bytes inserted between two frames (or before the first, or after the last): every
    frame is read back, the inserted stretch is reported."""
    segment = segment_of(batches)
    boundaries = [0, *(end for _, end in segment.spans)]
    at = data.draw(st.sampled_from(boundaries), label="at")
    garbage = data.draw(
        st.one_of(
            st.binary(min_size=1, max_size=200),
            st.binary(min_size=1, max_size=30).map(lambda b: MAGIC + b),
            st.binary(min_size=1, max_size=30).map(lambda b: LEGACY_MAGIC + b),
        ),
        label="garbage",
    )
    damaged = segment.data[:at] + garbage + segment.data[at:]
    changed = [(at, at + len(garbage))]
    expected = untouched_frames(segment, [], shift_from=at, shift=len(garbage))
    check(read_bytes(damaged), len(damaged), expected, changed)


@settings(deadline=None, max_examples=60)
@given(batches=batches_of_frames, data=st.data())
def test_damage_in_two_places(batches: list[list[Draft]], data: Any) -> None:
    """Damage in two places: both are reported, every frame they miss is read."""
    segment = segment_of(batches)
    size = len(segment.data)
    first = data.draw(st.integers(0, size - 1), label="first")
    second = data.draw(st.integers(0, size - 1), label="second")
    damaged = bytearray(segment.data)
    damaged[first] ^= 0x5A
    damaged[second] ^= 0xA5
    changed = [(p, p + 1) for p in sorted({first, second})]
    check(read_bytes(bytes(damaged)), size, untouched_frames(segment, changed), changed)


def frame_bytes(n: int, size: int = 20) -> bytes:
    header, payload = encode_frame([({"n": n}, [bytes([n]) * size], [])])
    return header + payload


def numbers(items: list[Item]) -> list[int]:
    return [
        record.meta["n"]
        for item in items
        if isinstance(item, Frame)
        for record in decode_payload(item.payload)
    ]


def test_header_layout_and_what_its_checksums_cover() -> None:
    """magic | length u64 | crc32(magic, length) | crc32(length, payload), little-endian."""
    header, payload = encode_frame([({"a": 1}, [b"x"], [b"y"])])
    magic, length, head_crc, crc = struct.unpack("<4sQII", header)
    assert (magic, length, len(header)) == (MAGIC, len(payload), FRAME_HEADER.size)
    assert head_crc == zlib.crc32(header[:12])
    assert crc == zlib.crc32(struct.pack("<Q", length) + payload)
    assert frame_header(zlib.crc32(payload, frame_crc(len(payload))), len(payload)) == header


def test_a_damaged_payload_is_skipped_by_its_verified_length() -> None:
    """The header still checks out: the frame is skipped whole, and nothing inside its
    payload is taken for a frame, not even a whole frame carried as a body."""
    inner = frame_bytes(99)
    header, payload = encode_frame([({"n": 1}, [b"x" * 10, inner, b"y" * 10], [])])
    carrier = bytearray(header + payload)
    carrier[len(header) + 2] ^= 0xFF  # in the record header, before the carried frame
    data = frame_bytes(0) + bytes(carrier) + frame_bytes(2)
    items = read_bytes(data)
    start = len(frame_bytes(0))
    assert numbers(items) == [0, 2]
    assert items[1] == Damage(start, start + len(carrier), "frame payload fails its checksum")


def test_the_scan_finds_a_frame_across_its_read_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A magic split between two scan blocks is found; memory stays within a block."""
    monkeypatch.setattr(frames, "_SCAN_BLOCK", 64)
    for gap in range(60, 70):
        data = frame_bytes(0) + b"\x00" * gap + frame_bytes(1)
        items = read_bytes(data)
        assert numbers(items) == [0, 1], gap
        assert isinstance(items[1], Damage) and items[1].end - items[1].offset == gap


def test_scanning_a_large_damaged_stretch_reads_in_blocks(tmp_path: Path) -> None:
    """32 MiB of garbage then a good frame: found, without holding the garbage."""
    path = tmp_path / "1.seg"
    garbage = 32 << 20
    with open(path, "wb") as handle:
        handle.write(frame_bytes(0))
        handle.write(b"\xee" * garbage)
        handle.write(frame_bytes(1))
    tracemalloc.start()
    try:
        items = list(read_frames(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert numbers(items) == [0, 1]
    assert isinstance(items[1], Damage) and items[1].end - items[1].offset == garbage
    assert peak < 8 << 20, f"the reader held {peak >> 20} MiB"


def test_damage_then_a_torn_frame_at_the_end() -> None:
    """Garbage, then a frame cut short: the damage is reported, then the tail is torn at
    the cut frame (a live writer may be writing it)."""
    good, cut = frame_bytes(0), frame_bytes(1)[:-3]
    items = read_bytes(good + b"junk" * 10 + cut)
    end = len(good) + 40
    assert items[1:] == [Damage(len(good), end, "no frame header"), Tail(end, "torn")]


def test_a_damaged_last_frame_is_a_corrupt_tail() -> None:
    """Damage with no good frame after it is the tail: corrupt, where the damage starts."""
    good, last = frame_bytes(0), bytearray(frame_bytes(1))
    last[-1] ^= 1
    assert read_bytes(good + bytes(last))[1:] == [Tail(len(good), "corrupt")]
    assert read_bytes(good + b"\x00" * 100)[1:] == [Tail(len(good), "corrupt")]


@pytest.mark.parametrize("cut", [1, 2, 3, 10, 19])
def test_a_header_cut_short_is_torn(cut: int) -> None:
    good = frame_bytes(0)
    assert read_bytes(good + frame_bytes(1)[:cut])[1:] == [Tail(len(good), "torn")]


def test_reading_from_past_the_end_is_a_clean_end() -> None:
    """A checkpoint past the end of its segment ends cleanly there: it never wedges."""
    data = frame_bytes(0)
    assert read_bytes(data, len(data) + 100) == [Tail(len(data) + 100, "end")]


def test_reading_resumes_after_damage_from_a_checkpoint() -> None:
    """A checkpoint taken after damage (the frame past it) reads on from there."""
    first, second = frame_bytes(0), frame_bytes(1)
    data = first + b"\xff" * 50 + second
    assert numbers(read_bytes(data, len(first) + 50)) == [1]
    assert numbers(read_bytes(data, len(first) + 7)) == [1]  # mid-damage: scans again


# -- version 1 ----------------------------------------------------------------------------


def legacy_frame(n: int, size: int = 20) -> bytes:
    _, payload = encode_frame([({"n": n}, [bytes([n]) * size], [])])
    return LEGACY_FRAME_HEADER.pack(LEGACY_MAGIC, zlib.crc32(payload), len(payload)) + payload


def legacy_segment(count: int) -> tuple[bytes, list[int]]:
    data, offsets = b"", []
    for n in range(count):
        offsets.append(len(data))
        data += legacy_frame(n)
    return data, offsets


def test_a_legacy_segment_is_read() -> None:
    """Frames written before the upgrade come back as they were, to a clean end."""
    data, offsets = legacy_segment(4)
    items = read_bytes(data)
    assert numbers(items) == [0, 1, 2, 3]
    assert [i.offset for i in items if isinstance(i, Frame)] == offsets
    assert items[-1] == Tail(len(data), "end")
    assert numbers(read_bytes(data, offsets[2])) == [2, 3]


def test_a_legacy_segment_cut_short_is_torn() -> None:
    data, offsets = legacy_segment(3)
    for cut in (1, 5, 15, 20, len(data) - offsets[2] - 1):
        items = read_bytes(data[: offsets[2] + cut])
        assert numbers(items) == [0, 1] and items[-1] == Tail(offsets[2], "torn"), cut


def test_damage_in_a_legacy_segment_is_skipped() -> None:
    """A legacy frame that fails its checksum, or whose length was damaged (it then seems
    to run past the end), costs that frame only when good frames follow."""
    data, offsets = legacy_segment(3)
    flipped = bytearray(data)
    flipped[offsets[1] + 20] ^= 1
    items = read_bytes(bytes(flipped))
    assert numbers(items) == [0, 2]
    assert items[1] == Damage(offsets[1], offsets[2], "legacy frame fails its checksum")
    huge = bytearray(data)
    huge[offsets[1] + 15] = 0x7F  # the top byte of the length
    items = read_bytes(bytes(huge))
    assert numbers(items) == [0, 2]
    assert isinstance(items[1], Damage) and [items[1].offset, items[1].end] == offsets[1:3]


def test_a_legacy_segment_then_new_frames() -> None:
    """Each frame is read by its own magic."""
    data, _ = legacy_segment(2)
    assert numbers(read_bytes(data + frame_bytes(7) + legacy_frame(8))) == [0, 1, 7, 8]


def test_the_reader_closes_its_file_when_abandoned(tmp_path: Path) -> None:
    """A consumer that stops early (a shipper stopping mid-segment) leaks no descriptor."""
    path = tmp_path / "1.seg"
    path.write_bytes(frame_bytes(0) + frame_bytes(1))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        items = read_frames(path)
        next(items)
        assert isinstance(items, types.GeneratorType)
        items.close()
    assert len(os.listdir("/proc/self/fd")) <= before
