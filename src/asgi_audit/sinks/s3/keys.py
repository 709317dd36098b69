"""Where objects go in the bucket: the key layout, written and read back from listings.

Layout (keys relative to ``<prefix>/``, which may be empty)::

    dt=YYYY-MM-DD/hour=HH/<stream>/<first-seq>-<last-seq>.aab
    index/dt=YYYY-MM-DD/hour=HH/<stream>/<first-seq>-<last-seq>.json.zst
    checkpoints/<stream>/<index>.json

Time comes first so that a time-range search lists only the ``dt=/hour=`` prefixes of its
range, and a lifecycle rule can expire old days. The data object's date and hour are
those of its batch's first record start (UTC); an index object's are those of the records
it holds (see :mod:`.index`). Sequence numbers are zero-padded to :data:`SEQ_DIGITS`
digits so that key order is sequence order, which is the order in which readers pick the
first of two copies of a record. ``<stream>`` is the stream id with every byte outside
``[A-Za-z0-9_.-]`` (and a leading ``.``) written as ``~XX``: keys stay ASCII, no segment is
``.`` or ``..``, and two streams never share a key.

Keys are bounded: S3 allows 1024 bytes, and stores on a file system (SeaweedFS, MinIO)
255 per segment. The stream id comes from configuration (service and pod names) and its
escaped form can be three times as long, so a segment over :data:`SEGMENT_BYTES` is cut
(never inside a ``~XX``) and ends with ``~h`` and 16 hex digits of the SHA-256 of the
stream id (:func:`stream_segment`): ``~h`` never occurs in an escaped segment (``~`` is
always followed by two upper-case hex digits there), so a bounded segment never equals
another stream's, and two long streams stay apart. Nothing is read back from a key: the
index carries the whole stream id. With the prefix held to :data:`PREFIX_BYTES` (checked
with the URL), the longest key is under 600 bytes. Records' own values (paths,
correlation ids) are never part of a key.

A re-delivered batch has the same stream and first/last sequence numbers, hence the same
keys: that is what makes writes idempotent (see :mod:`.sink`).

Checkpoints have no time in their keys: a lifecycle rule that expires old days of records
must not take the checkpoints that vouch for the days kept. One object per checkpoint,
its index zero-padded like sequence numbers, so that a stream's checkpoints list in order
and a re-delivered one has the key of the first copy.
"""

from __future__ import annotations

import hashlib
import re
import string
import uuid
from datetime import UTC, date, datetime

HOUR_NS = 3600 * 1_000_000_000
SEQ_DIGITS = 12
DATA_SUFFIX = ".aab"
"""Data objects: "asgi-audit batch"."""
INDEX_SUFFIX = ".json.zst"
INDEX_DIR = "index"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".json"
SEGMENT_BYTES = 200
"""The longest stream segment of a key (under the 255 bytes a file-system store allows)."""
PREFIX_BYTES = 256
"""The longest prefix (UTF-8) a URL may give: with the longest segments after it, a key
stays far under S3's 1024 bytes."""
DIGEST_CHARS = 16

_KEY_SAFE = frozenset(string.ascii_letters + string.digits + "_-.")
_DAY = re.compile(r"dt=(\d{4})-(\d{2})-(\d{2})/$")
_HOUR = re.compile(r"hour=(\d{2})/$")
_EPOCH = date(1970, 1, 1)
_CHECKPOINT_KEY = re.compile(
    rf"{CHECKPOINT_DIR}/([^/]+)/(\d{{{SEQ_DIGITS},}}){re.escape(CHECKPOINT_SUFFIX)}"
)


def key_segment(text: str) -> str:
    """``text`` as one safe, reversible key segment (see the module docstring)."""
    if not text:
        return "~"
    out: list[str] = []
    for position, char in enumerate(text):
        if char in _KEY_SAFE and not (position == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"~{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def stream_segment(stream: str) -> str:
    """The key segment of a stream: :func:`key_segment`, bounded to :data:`SEGMENT_BYTES`
    (see the module docstring)."""
    segment = key_segment(stream)
    if len(segment) <= SEGMENT_BYTES:
        return segment
    digest = hashlib.sha256(stream.encode("utf-8", "surrogatepass")).hexdigest()
    cut = SEGMENT_BYTES - 2 - DIGEST_CHARS
    tilde = segment.rfind("~", cut - 2, cut)
    if tilde >= 0:  # never keep half of an escape
        cut = tilde
    return f"{segment[:cut]}~h{digest[:DIGEST_CHARS]}"


def stream_segments(stream: str) -> frozenset[str]:
    """The segments under which ``stream``'s objects may be: its bounded one, and its whole
    escaped form, which keys written before segments were bounded hold."""
    return frozenset({stream_segment(stream), key_segment(stream)})


def segment_of(key: str) -> str:
    """The stream segment of a data, index or checkpoint key (the folder it is in)."""
    return key.rsplit("/", 2)[-2] if key.count("/") >= 2 else ""


def checkpoint_key(stream: str, index: int) -> str:
    """The object of one checkpoint (see the module docstring)."""
    return f"{checkpoint_prefix(stream)}{index:0{SEQ_DIGITS}d}{CHECKPOINT_SUFFIX}"


def checkpoint_prefix(stream: str | None = None) -> str:
    """Where every checkpoint is, or (given ``stream``) that stream's: the trailing ``/``
    keeps a stream from listing another whose segment its own begins."""
    if stream is None:
        return f"{CHECKPOINT_DIR}/"
    return f"{CHECKPOINT_DIR}/{stream_segment(stream)}/"


def checkpoint_listed(key: str) -> tuple[str, int] | None:
    """(stream segment, index) of a listed checkpoint key (relative to the prefix), or
    None for an object that is not one."""
    match = _CHECKPOINT_KEY.fullmatch(key)
    return None if match is None else (match.group(1), int(match.group(2)))


def hour_path(hour: int) -> str:
    """``dt=YYYY-MM-DD/hour=HH`` of an hour number (hours since the epoch, UTC)."""
    moment = datetime.fromtimestamp(hour * 3600, tz=UTC)
    return f"dt={moment:%Y-%m-%d}/hour={moment:%H}"


def hour_of(started_at_ns: int) -> int:
    return started_at_ns // HOUR_NS


def batch_name(first_seq: int, last_seq: int) -> str:
    return f"{first_seq:0{SEQ_DIGITS}d}-{last_seq:0{SEQ_DIGITS}d}"


def data_key(hour: int, stream: str, first_seq: int, last_seq: int) -> str:
    """The data object of a batch whose first record started in ``hour``."""
    name = batch_name(first_seq, last_seq)
    return f"{hour_path(hour)}/{stream_segment(stream)}/{name}{DATA_SUFFIX}"


def index_key(hour: int, stream: str, first_seq: int, last_seq: int) -> str:
    """The index object of a batch's records that started in ``hour``."""
    name = batch_name(first_seq, last_seq)
    return f"{INDEX_DIR}/{hour_path(hour)}/{stream_segment(stream)}/{name}{INDEX_SUFFIX}"


def index_hour_prefix(hour: int) -> str:
    """The prefix of every index object of one hour partition."""
    return f"{INDEX_DIR}/{hour_path(hour)}/"


def index_prefix(day: int | None = None) -> str:
    """The prefix of every index object, or (given ``day``) of one day's: where the days,
    or the hours of ``day``, are listed."""
    if day is None:
        return f"{INDEX_DIR}/"
    return f"{INDEX_DIR}/{hour_path(day * 24).split('/')[0]}/"


def day_listed(common_prefix: str) -> int | None:
    """The day (since the epoch) a listed ``.../dt=YYYY-MM-DD/`` prefix names, if any."""
    match = _DAY.search(common_prefix)
    if not match:
        return None
    try:
        return (date(*map(int, match.groups())) - _EPOCH).days
    except ValueError:
        return None


def hour_listed(common_prefix: str, day: int) -> int | None:
    """The hour number a listed ``.../hour=HH/`` prefix of ``day`` names, if any."""
    match = _HOUR.search(common_prefix)
    if match and int(match.group(1)) < 24:
        return day * 24 + int(match.group(1))
    return None


def id_hours(record_id: str) -> list[int]:
    """Hours to look in first for ``record_id``: a UUIDv7 id is made when the exchange ends,
    so its start is in that hour or (for a long exchange) before it."""
    try:
        value = uuid.UUID(record_id)
    except ValueError:
        return []
    if value.version != 7:
        return []
    hour = hour_of((value.int >> 80) * 1_000_000)
    return [hour, hour - 1]
