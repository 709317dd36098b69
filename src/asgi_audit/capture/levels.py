"""Audit levels, named as in Kubernetes API-server audit policies.

Operators who write Kubernetes audit policies already know what ``Metadata`` and
``RequestResponse`` mean; reusing the words saves them a translation table.
"""

from __future__ import annotations

import enum

from ..errors import ConfigError


class Level(enum.IntEnum):
    """How much of an exchange is recorded. Ordered: a higher level records more."""

    NONE = 0
    METADATA = 1
    REQUEST = 2
    REQUEST_RESPONSE = 3

    @property
    def word(self) -> str:
        """The configuration word for this level (``"RequestResponse"``)."""
        return _WORDS[self]

    def __repr__(self) -> str:
        return repr(self.word)

    @classmethod
    def parse(cls, value: object, parameter: str) -> Level:
        """Read a level from a word (any case) or a ``Level``; fail naming ``parameter``."""
        if isinstance(value, Level):
            return value
        if isinstance(value, str):
            found = _BY_WORD.get(value.strip().lower())
            if found is not None:
                return found
        if value is None:
            return cls.NONE
        choices = ", ".join(repr(w) for w in _WORDS.values())
        raise ConfigError(parameter, f"must be one of {choices} (got {value!r})")


_WORDS = {
    Level.NONE: "None",
    Level.METADATA: "Metadata",
    Level.REQUEST: "Request",
    Level.REQUEST_RESPONSE: "RequestResponse",
}
_BY_WORD = {word.lower(): level for level, word in _WORDS.items()}
