"""The bucket through boto3: every S3 call the sink makes, and what its failures mean.

boto3 and botocore are imported inside the functions, never at module level: the app
process checks ``s3://`` URLs without them, and only the shipper (or the CLI) that opens
a sink needs them.

Failures are sorted for the caller: what a person must fix (no such bucket, credentials
refused, Object Lock missing) is a :class:`ConfigError` when the bucket is checked; the
rest (unreachable endpoint, throttling, a bucket removed after open) is a
:class:`SinkError`, which the shipper retries. A PUT refused for what it carries (an object
or key too large, an argument the store will not take: :data:`REFUSED_CODES`, or HTTP 413
and 414 from a proxy) is an :class:`ObjectRefused`, which the sink turns into a refusal of
the records in that object; authentication, throttling, 5xx and connection errors are not
about the content and stay retried. Every PUT carries ``If-None-Match: *``, so
an object once written is never replaced (write-once, even in a versioned bucket), and
``Content-MD5``, so the server refuses bytes damaged on the way (and Object Lock asks
for it).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from ...errors import ConfigError, RecordRefused, SinkError
from .url import MISSING_BOTO3, S3Options

REFUSED_CODES = frozenset(
    {
        "EntityTooLarge",
        "KeyTooLongError",
        "InvalidArgument",
        "InvalidObjectName",
        "XMinioInvalidObjectName",
    }
)
"""S3 error codes of a PUT refused for its key or its bytes, which no retry changes."""
KEY_CODES = frozenset({"KeyTooLongError", "InvalidObjectName", "XMinioInvalidObjectName"})
"""Of those, the ones about the key: every record sharing it is at fault."""
REFUSED_STATUSES = frozenset({413, 414})
"""Request entity too large, URI too long: what a proxy in front of a store answers."""


class ObjectRefused(RecordRefused):
    """A PUT the store refused for the object's key or bytes (see :data:`REFUSED_CODES`)."""

    def __init__(self, label: str, detail: str, *, code: str) -> None:
        super().__init__(f"{label}: {detail}")
        self.code = code
        self.detail = detail
        """The reason without the sink's label (the store's code first, the key last)."""

    @property
    def about_key(self) -> bool:
        """Whether the key was refused (rather than what the object holds)."""
        return self.code in KEY_CODES or self.code == "414"


class Bucket:
    """One bucket through one boto3 client (thread-safe); ``label`` starts every message."""

    def __init__(self, options: S3Options, label: str) -> None:
        self.options = options
        self.name = options.bucket
        self.label = label
        self.checked = False
        """Whether :meth:`check` has succeeded (it is retried before writing until then)."""
        self._client: Any = make_client(options)

    @property
    def client(self) -> Any:
        """The boto3 S3 client; SinkError once closed."""
        client = self._client
        if client is None:
            raise SinkError(f"{self.label} is closed")
        return client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def get(self, key: str, offset: int | None = None, length: int | None = None) -> bytes:
        """The object ``key``, or ``length`` bytes of it from ``offset`` (a ranged GET)."""
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {"Bucket": self.name, "Key": key}
        if offset is not None and length is not None:
            if length == 0:
                return b""
            params["Range"] = f"bytes={offset}-{offset + length - 1}"
        try:
            response = self.client.get_object(**params)
            with contextlib.closing(response["Body"]) as stream:
                data: bytes = stream.read()
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, f"cannot read {key}") from exc
        if length is not None and len(data) != length:
            raise SinkError(
                f"{self.label}: {key}: read {len(data)} bytes at {offset}, not {length}"
            )
        return data

    def put(self, key: str, body: bytes, md5: bytes, content_type: str) -> bool:
        """Create ``key``; False when it exists already (kept as it is: write once)."""
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {
            "Bucket": self.name,
            "Key": key,
            "Body": body,
            "ContentMD5": base64.b64encode(md5).decode("ascii"),
            "ContentType": content_type,
            "IfNoneMatch": "*",
        }
        if self.options.object_lock is not None and self.options.retain_days is not None:
            params["ObjectLockMode"] = self.options.object_lock
            params["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(
                days=self.options.retain_days
            )
        try:
            self.client.put_object(**params)
        except ClientError as exc:
            status, code = _status(exc), _code(exc)
            if status == 412 or code == "PreconditionFailed":
                return False
            if code in REFUSED_CODES or status in REFUSED_STATUSES:
                code = code or str(status)
                detail = f"{code}: {_message(exc)} (PUT of {key})"
                raise ObjectRefused(self.label, detail, code=code) from exc
            raise self._failure(exc, f"cannot store {key}") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, f"cannot store {key}") from exc
        return True

    def etag(self, key: str) -> str:
        """The ETag of ``key``, unquoted (the MD5 of its bytes: objects are one PUT each)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.name, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, f"cannot read {key}") from exc
        return str(head.get("ETag", "")).strip('"')

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""
        for page in self._list(prefix, None):
            for item in page.get("Contents") or []:
                yield str(item["Key"])

    def prefixes(self, prefix: str) -> Iterator[str]:
        """The common prefixes one ``/`` below ``prefix`` (the "directories" there)."""
        for page in self._list(prefix, "/"):
            for item in page.get("CommonPrefixes") or []:
                yield str(item["Prefix"])

    def _list(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        while True:
            try:
                page: dict[str, Any] = self.client.list_objects_v2(**params)
            except (ClientError, BotoCoreError) as exc:
                raise self._failure(exc, f"cannot list {prefix}") from exc
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    def check(self) -> None:
        """The bucket exists, the credentials open it, and it has Object Lock if asked.
        ConfigError for what a person must fix; SinkError when the endpoint is unreachable."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        client = self.client
        where = self.options.endpoint_url or "the default AWS endpoint"
        try:
            client.head_bucket(Bucket=self.name)
            if self.options.object_lock is not None:
                lock = client.get_object_lock_configuration(Bucket=self.name)
                if lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
                    raise self._no_object_lock()
        except NoCredentialsError as exc:
            raise ConfigError(
                "sink",
                f"no credentials for s3://{self.name}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or mount a shared credentials file",
            ) from exc
        except ClientError as exc:
            status, code = _status(exc), _code(exc)
            if code in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"):
                raise self._no_object_lock() from exc
            if status == 404 or code in ("NoSuchBucket", "NotFound"):
                raise ConfigError(
                    "sink",
                    f"bucket {self.name!r} does not exist at {where}; create it first "
                    "(asgi-audit never creates buckets: versioning, Object Lock, lifecycle and "
                    "access are the bucket owner's choice)",
                ) from exc
            if status in (401, 403):
                raise ConfigError(
                    "sink",
                    f"access to bucket {self.name!r} at {where} denied ({code}): check the "
                    "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the "
                    "bucket policy",
                ) from exc
            raise self._failure(exc, "cannot check the bucket") from exc
        except BotoCoreError as exc:
            raise self._failure(exc, f"cannot reach {where}") from exc
        self.checked = True

    def _no_object_lock(self) -> ConfigError:
        return ConfigError(
            "sink",
            f"object_lock={self.options.object_lock.lower() if self.options.object_lock else ''}"
            f" needs Object Lock, and bucket {self.name!r} has no Object Lock enabled; "
            "create the bucket with Object Lock (which also turns on versioning) or drop "
            "object_lock from the URL",
        )

    def _failure(self, exc: Exception, doing: str) -> SinkError:
        if _code(exc) == "NoSuchBucket":
            return SinkError(f"{self.label}: {doing}: bucket {self.name!r} does not exist")
        return SinkError(f"{self.label}: {doing}: {exc}")


def make_client(options: S3Options) -> Any:
    """A boto3 S3 client for ``options``; ConfigError when boto3 is missing or the
    profile or endpoint cannot be used."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound
    except ImportError as exc:
        raise ConfigError("sink", f"{MISSING_BOTO3} ({exc})") from None
    try:
        session = boto3.session.Session(profile_name=options.profile)
    except ProfileNotFound as exc:
        raise ConfigError("sink", f"AWS profile {options.profile!r} not found: {exc}") from exc
    settings: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"mode": "standard", "max_attempts": 3},
        "max_pool_connections": 16,
    }
    if options.addressing_style is not None:
        settings["s3"] = {"addressing_style": options.addressing_style}
    try:
        # Every PUT carries Content-MD5 already: skip the extra CRC that boto3 >= 1.36 adds
        # by default (some S3-compatible servers refuse it); frames carry their own CRC-32.
        config = Config(
            **settings,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    except TypeError:  # botocore < 1.36 has neither option, nor the default they undo
        config = Config(**settings)
    try:
        return session.client(
            "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config
        )
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError("sink", f"cannot make an S3 client: {exc}") from exc


def _status(exc: Exception) -> int | None:
    """The HTTP status of a botocore ``ClientError`` (None for other errors)."""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _message(exc: Exception) -> str:
    """The S3 error message of a botocore ``ClientError`` (its text for other errors)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Message", "") or exc)


def _code(exc: Exception) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for other errors)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
