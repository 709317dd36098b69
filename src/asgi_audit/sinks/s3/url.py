"""The ``s3://`` URL, read and checked without boto3.

The app checks its sink URL when the middleware is built, in a process that never ships
and need not have boto3 installed; so everything a URL can get wrong is found here, from
the text alone, before any client or network call exists.

Credentials never come from the URL (it ends up in logs and process listings; a URL
carrying one is refused, and shown masked by :func:`asgi_audit._urls.mask_url`): boto3's
usual chain finds them, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and
``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` or ``?profile=``, the shared credentials file, web
identity (EKS service accounts), container and instance roles.

Object Lock: ``?object_lock=governance|compliance&retain_days=N`` puts every object (data
and index) under that retention mode until N days after its write. The bucket must have
Object Lock enabled (checked at open). A bucket with a default retention rule needs no
option at all. Retention (deleting old data) is a lifecycle rule on the bucket, since
objects are never rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from ..._urls import mask_url
from ...errors import ConfigError
from .keys import PREFIX_BYTES

MISSING_BOTO3 = "s3:// needs boto3: pip install 'asgi-audit[s3]'"

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_OPTIONS = (
    "endpoint_url",
    "region",
    "profile",
    "addressing_style",
    "object_lock",
    "retain_days",
)
_EXAMPLE = "s3://bucket/prefix?endpoint_url=https://s3.example.com&region=us-east-1"
_NO_CREDENTIALS = (
    "credentials do not belong in the URL; set AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or mount a credentials file)"
)


@dataclass(frozen=True, slots=True)
class S3Options:
    """What an ``s3://`` URL says, checked."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str | None = None
    object_lock: str | None = None
    """``GOVERNANCE`` or ``COMPLIANCE``."""
    retain_days: int | None = None


def parse_url(url: str) -> S3Options:
    """Read ``s3://bucket/prefix?option=value&...``; every mistake is a :class:`ConfigError`."""
    parts = urlsplit(url)
    shown = mask_url(url)
    if parts.scheme.lower() != "s3":
        raise ConfigError("sink", f"expected an s3:// URL such as {_EXAMPLE!r} (got {shown!r})")
    if "@" in parts.netloc:
        raise ConfigError("sink", _NO_CREDENTIALS)
    bucket = parts.netloc
    if not bucket:
        raise ConfigError("sink", f"{shown!r} names no bucket; expected {_EXAMPLE!r}")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(
            "sink",
            f"{bucket!r} is not a bucket name (letters, digits, '.', '-', '_'); the endpoint "
            f"goes in ?endpoint_url=, as in {_EXAMPLE!r}",
        )
    if parts.fragment:
        # The fragment is not shown: whatever it holds was not meant to be part of a URL.
        raise ConfigError("sink", f"unexpected '#...' after {mask_url(url.partition('#')[0])!r}")
    prefix = unquote(parts.path).strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ConfigError("sink", f"prefix {prefix!r} has an empty, '.' or '..' segment")
    if len(prefix.encode("utf-8", "surrogatepass")) > PREFIX_BYTES:
        raise ConfigError(
            "sink", f"the prefix has more than {PREFIX_BYTES} bytes; object keys would be too long"
        )
    values = _options(url, parts.query)
    endpoint = values.get("endpoint_url")
    if endpoint is not None and "@" in urlsplit(endpoint).netloc:
        raise ConfigError("sink", _NO_CREDENTIALS)
    if endpoint is not None and not re.match(r"https?://[^/?#]+", endpoint):
        raise ConfigError(
            "sink", f"endpoint_url must be http(s)://host[:port] (got {mask_url(endpoint)!r})"
        )
    style = values.get("addressing_style")
    if style is not None and style not in ("auto", "path", "virtual"):
        raise ConfigError("sink", f"addressing_style is auto, path or virtual (got {style!r})")
    mode = values.get("object_lock")
    if mode is not None and mode.lower() not in ("governance", "compliance"):
        raise ConfigError("sink", f"object_lock is governance or compliance (got {mode!r})")
    days_text = values.get("retain_days")
    days: int | None = None
    if days_text is not None:
        if not days_text.isdigit() or int(days_text) < 1:
            raise ConfigError(
                "sink", f"retain_days must be a whole number >= 1 (got {days_text!r})"
            )
        days = int(days_text)
    if (mode is None) != (days is None):
        raise ConfigError(
            "sink", "object_lock and retain_days go together: ?object_lock=compliance&retain_days=N"
        )
    return S3Options(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        region=values.get("region"),
        profile=values.get("profile"),
        addressing_style=style,
        object_lock=None if mode is None else mode.upper(),
        retain_days=days,
    )


def _options(url: str, query: str) -> dict[str, str]:
    """The query's options: each known, given once, and with a value."""
    values: dict[str, str] = {}
    shown = mask_url(url)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            hint = f"; {_NO_CREDENTIALS}" if mask_url(f"s3://b/?{key}=x").endswith("***") else ""
            raise ConfigError(
                "sink",
                f"unknown option {key!r} in {shown!r}; known: {', '.join(_OPTIONS)}{hint}",
            )
        if key in values:
            raise ConfigError("sink", f"option {key!r} given twice in {shown!r}")
        if not value:
            raise ConfigError("sink", f"option {key!r} has no value in {shown!r}")
        values[key] = value
    return values
