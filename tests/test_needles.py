"""The redaction prefilter answers alike with Hyperscan and without it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_audit.recording import needles
from asgi_audit.recording.needles import Prefilter
from asgi_audit.recording.redact_body import _ASCII_ESCAPE_FOUND, _VALUE_SHAPES_FOUND, BodyRedactor

pytestmark = pytest.mark.skipif(
    not needles.accelerated(), reason="hyperscan has no wheel for this platform"
)

NEEDLES = (b"passw", b"token", b'"cv', b'"pin"', b"apikey")
# Bytes that build needles, their folded spellings, card digits and what surrounds them.
ALPHABET = b'paswordtkenPASWTOKcvin"_-.:,[ \t\r\n0123456789eyJ\\ux{}'

bodies = st.lists(st.sampled_from(sorted(set(ALPHABET))), max_size=80).map(bytes) | st.lists(
    st.sampled_from([*NEEDLES, b"Pass_W", b"TO-KEN", b"4111 1111", b"11111", b'":', b"eyJ"])
    | st.sampled_from(sorted(set(ALPHABET))).map(lambda b: bytes([b])),
    max_size=25,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_one_pass_answers_as_the_plain_passes(body: bytes) -> None:
    fast = Prefilter(NEEDLES, _VALUE_SHAPES_FOUND)
    plain = Prefilter(NEEDLES, _VALUE_SHAPES_FOUND, accelerate=False)
    assert fast.found_in(body) == plain.found_in(body), body


def test_names_are_found_however_they_are_spelt() -> None:
    fast = Prefilter(NEEDLES)
    assert fast.found_in(b'{"Pass_Word": 1}')
    assert fast.found_in(b'{"x": {"ACCESS-TO.KEN": 1}}')
    assert not fast.found_in(b'{"pass": "word"}')
    assert not fast.found_in(b"")


@pytest.mark.parametrize("accelerate", [True, False])
def test_card_shapes_and_escapes_are_found(accelerate: bool) -> None:
    fast = Prefilter((), (*_ASCII_ESCAPE_FOUND, *_VALUE_SHAPES_FOUND), accelerate=accelerate)
    assert fast.found_in(b'{"n": "4111 1111 1111 1111"}')
    assert fast.found_in(b"4111111111111")
    assert fast.found_in(b'{"x": "\\u0041"}')
    assert fast.found_in(b'{"x": "\\u007A"}')
    assert fast.found_in(b'{"t": "eyJhbGciOi"}')
    assert not fast.found_in(b'{"price": 12.4111111111111111, "date": "2026-12-01"}')
    # escapes of letters beyond ASCII spell no ASCII name, digit or JWT
    assert not fast.found_in(b'{"name": "Zo\\u00eb", "ok": "\\u2713", "e": "\\ud83d\\ude00"}')


def test_needles_must_be_folded() -> None:
    with pytest.raises(ValueError, match="not folded"):
        Prefilter([b"Token"])
    with pytest.raises(ValueError, match="empty"):
        Prefilter([b""])


def test_the_body_redactor_redacts_behind_the_prefilter() -> None:
    redactor = BodyRedactor()
    assert redactor.redact(b'{"price": 12}', "application/json") is None
    found = redactor.redact(b'{"Pass_Word": "hunter2"}', "application/json")
    assert found is not None and b"hunter2" not in found.data
