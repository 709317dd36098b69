"""Ed25519 keys for checkpoints: the operator's private key signs, anyone's copy of the
public key verifies.

A checkpoint signed with a key the writer alone holds cannot be forged by whoever can
write the store; the public key given to ``asgi-audit verify`` decides whose signatures
count. Keys are PEM (PKCS#8 private, SubjectPublicKeyInfo public), the form ``openssl
genpkey -algorithm ed25519`` and ``asgi-audit keys generate`` write. The signing key may be
given as a file path (a Kubernetes Secret mounted as a file) or as the PEM text itself (an
environment variable); its bytes never appear in a message, a log or a ``repr``.
``cryptography`` is imported only when a key is used.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PublicKey,
    )

PEM_START = "-----BEGIN"
MAX_KEY_FILE = 64 << 10


def key_id(public: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key (SHA-256 of its raw bytes)."""
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """Signs with a private key; ``repr`` names the key by its id only."""

    key_id: str
    _key: Any = field(repr=False, compare=False)

    def sign(self, content: bytes) -> str:
        return base64.b64encode(self._key.sign(content)).decode("ascii")

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(
            self._key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


@dataclass(frozen=True)
class Verifier:
    """Checks signatures made by one key."""

    key_id: str
    _key: Any = field(repr=False, compare=False)

    def verify(self, signature: str, content: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            raw = base64.b64decode(signature, validate=True)
            self._key.verify(raw, content)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def _pem_of(source: str | bytes, parameter: str) -> bytes:
    """The PEM bytes of ``source``: the text itself, or the file it names."""
    if isinstance(source, bytes):
        return source
    if source.lstrip().startswith(PEM_START):
        return source.encode("ascii", "replace")
    try:
        with open(os.path.expanduser(source), "rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(
            parameter, f"cannot read the key file {_shown(source)} ({exc.strerror})"
        ) from None
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(parameter, f"{_shown(source)} is too large to be a key file")
    return data


def _shown(source: str) -> str:
    """A path as an error may show it: a value that does not look like a path (a key
    pasted without its PEM armour, say) is not repeated."""
    if len(source) < 256 and "/" in source and not any(c.isspace() for c in source):
        return repr(source)
    return "(the value given does not name a readable file; it is not shown)"


def load_signer(source: str | bytes, parameter: str = "signing_key") -> Signer:
    """A signer from a PEM private key (a path, or the PEM text); ConfigError otherwise,
    never quoting the key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = _pem_of(source, parameter)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        reason = "encrypted keys are not supported" if "password" in str(exc) else "not PEM"
        raise ConfigError(
            parameter, f"expected an unencrypted Ed25519 private key in PEM ({reason})"
        ) from None
    except Exception:  # cryptography's UnsupportedAlgorithm and friends
        raise ConfigError(parameter, "expected an Ed25519 private key in PEM") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(parameter, f"expected an Ed25519 key (got {type(key).__name__})")
    return Signer(key_id(key.public_key()), key)


def load_verifier(source: str | bytes, parameter: str = "--public-key") -> Verifier:
    """A verifier from a PEM public key (or a private one, whose public half is used)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = _pem_of(source, parameter)
    if b"PRIVATE KEY" in pem:
        return Verifier(load_signer(pem, parameter).key_id, _public_of(pem))
    try:
        key = serialization.load_pem_public_key(pem)
    except Exception:
        raise ConfigError(parameter, "expected an Ed25519 public key in PEM") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(parameter, f"expected an Ed25519 key (got {type(key).__name__})")
    return Verifier(key_id(key), key)


def _public_of(pem: bytes) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key.public_key()


def generate() -> tuple[bytes, bytes]:
    """A new key pair as PEM: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public
