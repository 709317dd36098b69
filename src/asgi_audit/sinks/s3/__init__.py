"""``s3://bucket/prefix?endpoint_url=...``: S3-compatible object storage, one object per batch.

Why object storage: pods come and go, so records must leave the pod; a bucket is cheap,
has no server for the team to run, keeps data for years, and with Object Lock can make it
write-once. Objects cannot be appended to or updated in place, so the sink is built from
immutable objects only: every ``write_batch`` writes new objects and never changes one.

Per batch and stream, one data object holds the records' frames, and one index object per
hour the records started in lists them, with where each frame is; readers read indexes,
and fetch a body with a ranged GET of its frame only when asked for it.

The package is split by concern, each module saying why it is as it is:

* :mod:`.url`: the ``s3://`` URL and its options (credentials, Object Lock).
* :mod:`.keys`: the key layout, ``dt=/hour=/<stream>/<first>-<last>``.
* :mod:`.frames`: the data object's format, self-contained checksummed frames.
* :mod:`.index`: index objects, their cache, and how frames are fetched together.
* :mod:`.bucket`: the boto3 client and every S3 call, and what its failures mean.
* :mod:`.sink`: :class:`~.sink.S3Sink`, idempotent writes, de-duplicating reads, costs.

This module is what the sinks registry imports: its two hooks need neither boto3 nor
botocore (the app process checks its sink URL without them), and the sink, which does,
is imported only when one is opened.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ...errors import ConfigError
from .url import MISSING_BOTO3, parse_url

if TYPE_CHECKING:
    from .sink import S3Sink

__all__ = ["check_url", "open_url"]


def check_url(url: str) -> None:
    """What the app checks at start-up: the URL's form, and that boto3 is installed (found,
    not imported: the app process never needs it, only the shipper does)."""
    parse_url(url)
    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("sink", MISSING_BOTO3)


def open_url(url: str, *, create: bool = True) -> S3Sink:
    """The bucket is checked now (unless unreachable: then before the first write).
    ``create`` changes nothing: asgi-audit never creates buckets, and a missing one is an
    error either way."""
    from .sink import S3Sink

    return S3Sink(parse_url(url))
