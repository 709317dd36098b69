"""Spool framing: records round-trip exactly; a torn or damaged tail is found and located
(damage in the middle of a segment: test_frames.py)."""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_audit.recording import packing
from asgi_audit.recording.frames import (
    FRAME_HEADER,
    PACKED,
    Damage,
    Frame,
    SpooledRecord,
    Tail,
    decode_payload,
    encode_frame,
    read_frames,
)

Draft = tuple[dict[str, Any], list[bytes], list[bytes]]

latin1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), latin1)
metas = st.dictionaries(
    latin1,
    st.one_of(
        json_scalars,
        st.lists(st.tuples(latin1, latin1).map(list), max_size=4),
        st.dictionaries(latin1, json_scalars, max_size=4),
    ),
    max_size=8,
).filter(lambda meta: PACKED not in meta)  # the codec's own key: never in a record's meta
chunk_lists = st.lists(st.binary(max_size=300), max_size=5)
drafts = st.tuples(metas, chunk_lists, chunk_lists)
frames = st.lists(st.lists(drafts, max_size=5), min_size=1, max_size=5)
small_drafts = st.tuples(
    st.dictionaries(latin1, json_scalars, max_size=3),
    st.lists(st.binary(max_size=40), max_size=3),
    st.lists(st.binary(max_size=40), max_size=3),
)


def write_frames(path: Path, batches: list[list[Draft]]) -> list[int]:
    """Write one frame per batch; returns each frame's offset, and the file's end last."""
    offsets = [0]
    with open(path, "wb") as handle:
        for batch in batches:
            header, payload = encode_frame(batch)
            handle.write(header + payload)
            offsets.append(offsets[-1] + len(header) + len(payload))
    return offsets


def read_all(path: Path, offset: int = 0) -> tuple[list[Frame], Tail]:
    items = list(read_frames(path, offset))
    *found, tail = items
    assert isinstance(tail, Tail)
    assert all(isinstance(item, Frame) for item in found)
    return found, tail  # type: ignore[return-value]


def expected(batch: list[Draft]) -> list[SpooledRecord]:
    return [SpooledRecord(meta, b"".join(req), b"".join(resp)) for meta, req, resp in batch]


@settings(deadline=None, max_examples=100)
@given(batches=frames)
def test_records_round_trip_through_frames(batches: list[list[Draft]]) -> None:
    """Any metadata, any body bytes, any number of records and frames come back exactly."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "1.seg"
        offsets = write_frames(path, batches)
        found, tail = read_all(path)
    assert tail == Tail(offsets[-1], "end")
    assert [(f.offset, f.end) for f in found] == list(itertools.pairwise(offsets))
    for frame, batch in zip(found, batches, strict=True):
        assert list(decode_payload(frame.payload)) == expected(batch)


def test_reading_resumes_at_a_frame_offset(tmp_path: Path) -> None:
    """Reading from a frame's offset (a checkpoint) yields only the frames from there on."""
    path = tmp_path / "1.seg"
    batches = [[({"n": i}, [b"q%d" % i], [b"r%d" % i])] for i in range(4)]
    offsets = write_frames(path, batches)
    found, tail = read_all(path, offsets[2])
    assert [f.offset for f in found] == offsets[2:4]
    assert [next(decode_payload(f.payload)).meta for f in found] == [{"n": 2}, {"n": 3}]
    assert tail == Tail(offsets[-1], "end")


def test_empty_file_is_a_clean_end(tmp_path: Path) -> None:
    """An empty segment ends cleanly at byte 0."""
    path = tmp_path / "1.seg"
    path.write_bytes(b"")
    assert read_all(path) == ([], Tail(0, "end"))


@settings(deadline=None, max_examples=40)
@given(
    batches=st.lists(st.lists(small_drafts, max_size=3), max_size=3),
    last=st.lists(small_drafts, min_size=1, max_size=3),
)
def test_every_cut_of_the_last_frame_is_torn_at_its_offset(
    batches: list[list[Draft]], last: list[Draft]
) -> None:
    """Cutting the last frame anywhere reports it torn at its start; earlier ones are intact."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "1.seg"
        offsets = write_frames(path, [*batches, last])
        whole = path.read_bytes()
        start = offsets[-2]
        for cut in range(start + 1, len(whole)):
            path.write_bytes(whole[:cut])
            found, tail = read_all(path)
            assert tail == Tail(start, "torn"), cut
            assert len(found) == len(batches)
            for frame, batch in zip(found, batches, strict=True):
                assert list(decode_payload(frame.payload)) == expected(batch)


def test_a_flipped_payload_byte_costs_that_frame_only(tmp_path: Path) -> None:
    """A changed byte inside a frame's payload fails its checksum: that frame is reported
    as damage and skipped by its (verified) length; the last frame damaged is a corrupt
    tail (see test_frames.py for damage anywhere)."""
    path = tmp_path / "1.seg"
    batches = [[({"n": i}, [b"request %d" % i], [b"response %d" % i])] for i in range(3)]
    offsets = write_frames(path, batches)
    whole = bytearray(path.read_bytes())
    for position in range(offsets[1] + FRAME_HEADER.size, offsets[2]):
        damaged = bytearray(whole)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        items = list(read_frames(path))
        assert [type(i) for i in items] == [Frame, Damage, Frame, Tail], position
        assert items[1] == Damage(offsets[1], offsets[2], "frame payload fails its checksum")
        assert [i.offset for i in items if isinstance(i, Frame)] == [offsets[0], offsets[2]]
        assert items[3] == Tail(offsets[3], "end")
    for position in range(offsets[2] + FRAME_HEADER.size, offsets[3]):
        damaged = bytearray(whole)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        found, tail = read_all(path)
        assert tail == Tail(offsets[2], "corrupt"), position
        assert [f.offset for f in found] == offsets[:2]


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_bad_magic_is_corrupt(tmp_path: Path, position: int) -> None:
    """A frame that does not start with the magic is corrupt at its offset."""
    path = tmp_path / "1.seg"
    offsets = write_frames(path, [[({"a": 1}, [b"x"], [])], [({"b": 2}, [], [b"y"])]])
    whole = bytearray(path.read_bytes())
    whole[offsets[1] + position] ^= 0xFF
    path.write_bytes(bytes(whole))
    found, tail = read_all(path)
    assert tail == Tail(offsets[1], "corrupt")
    assert len(found) == 1


@pytest.mark.parametrize("position", [5, 11, 12, 15, 16, 19])
def test_a_flipped_length_or_checksum_byte_is_corrupt(tmp_path: Path, position: int) -> None:
    """The length (covered by the header's checksum) or a checksum field itself changed:
    the frame no longer verifies."""
    path = tmp_path / "1.seg"
    write_frames(path, [[({"a": 1}, [b"x"], [b"y"])]])
    whole = bytearray(path.read_bytes())
    whole[position] ^= 0x10
    path.write_bytes(bytes(whole))
    assert read_all(path) == ([], Tail(0, "corrupt"))


def test_large_payload_spanning_read_blocks(tmp_path: Path) -> None:
    """A frame larger than the reader's block size is read whole (and torn when cut)."""
    path = tmp_path / "1.seg"
    body = bytes(range(256)) * ((5 << 20) // 256 + 3)
    offsets = write_frames(path, [[({"big": True}, [body[:100], body[100:]], [b"ok"])]])
    found, tail = read_all(path)
    assert tail == Tail(offsets[-1], "end")
    [record] = decode_payload(found[0].payload)
    assert record.request == body and record.response == b"ok"
    with open(path, "r+b") as handle:
        handle.truncate(offsets[-1] - 1)
    assert read_all(path) == ([], Tail(0, "torn"))


pieces = st.lists(st.tuples(st.binary(min_size=1, max_size=50), st.integers(1, 200)), max_size=6)


@given(pieces)
@settings(max_examples=200, deadline=None)
def test_packed_body_unpacks_exactly_and_is_packed_when_a_store_would(
    parts: list[tuple[bytes, int]],
) -> None:
    """A packed body unpacks to itself, says its size, and is packed exactly when zstd
    saves a tenth (as a store would decide on its own)."""
    whole = b"".join(piece * times for piece, times in parts)
    packed = packing.pack(whole)
    _, encoding = packing.encode(whole)
    if packed is None:
        assert encoding == "identity"
    else:
        assert encoding == "zstd" and packing.decode(packed, "zstd") == whole
        assert packing.packed_size(packed) == len(whole)
        assert len(packed) * 10 <= len(whole) * 9 and len(whole) >= packing.MIN_SIZE


def test_repetitive_body_is_packed_and_random_one_is_not() -> None:
    """The property above is not vacuous: both outcomes happen."""
    assert packing.pack(b"ab" * 1000) is not None
    assert packing.pack(random.Random(5).randbytes(4000)) is None
