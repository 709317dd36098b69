"""Body redaction: secrets in JSON and form bodies are replaced before the spool sees
them, whatever their depth, key spelling or compression; bodies without rules are left
exactly as they are; a body with rules that cannot be read is replaced whole."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_audit.recording.redact import MARKER
from asgi_audit.recording.redact_body import (
    DEFAULT_SECRET_FIELDS,
    UNPARSEABLE,
    BodyRedaction,
    BodyRedactor,
)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
CARD = "4111 1111 1111 1111"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"


def redact_json(
    document: Any, redactor: BodyRedactor | None = None, content_type: str = JSON
) -> tuple[Any, list[str]] | None:
    """The redacted document and the paths, or None when the body is kept as it is."""
    result = (redactor or BodyRedactor()).redact(orjson.dumps(document), content_type)
    if result is None:
        return None
    assert not result.unparseable
    return orjson.loads(result.data), result.paths


def deflate(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush()


def inflate(data: bytes, wbits: int) -> bytes:
    return zlib.decompressobj(wbits).decompress(data)


def test_the_acceptance_example() -> None:
    """Password, card number and token go; the user name stays."""
    body = (
        b'{"user": "ann", "password": "hunter2", "card": {"number": "4111 1111 1111 1111"},'
        b' "items": [{"token": "abc.def.ghi"}]}'
    )
    result = BodyRedactor(fields=["card.number"]).redact(body, JSON)
    assert result is not None
    for secret in (b"hunter2", b"4111", b"abc.def.ghi"):
        assert secret not in result.data
    assert b"ann" in result.data
    assert result.paths == ["password", "card.number", "items[0].token"]
    assert not result.unparseable


def test_secret_names_are_found_at_any_depth_in_any_spelling() -> None:
    """Keys are compared lower-cased without ``_``, ``-`` and ``.``."""
    document = {
        "a": {"b": [{"c": {"Pass_Word": "x"}}]},
        "API-KEY": "k",
        "Private.Key": "pk",
        "cvv": 123,
        "authorization": "Basic eA==",
    }
    assert redact_json(document) == (
        {
            "a": {"b": [{"c": {"Pass_Word": MARKER}}]},
            "API-KEY": MARKER,
            "Private.Key": MARKER,
            "cvv": MARKER,
            "authorization": MARKER,
        },
        ["a.b[0].c.Pass_Word", "API-KEY", "Private.Key", "cvv", "authorization"],
    )


def test_long_names_also_match_as_the_end_of_a_key() -> None:
    """``new_password``, ``clientSecret``, ``id_token`` and ``X-Api-Key`` are secret."""
    document = {"new_password": "a", "clientSecret": "b", "id_token": "c", "X-Api-Key": "d"}
    redacted = redact_json(document)
    assert redacted is not None
    assert redacted[0] == dict.fromkeys(document, MARKER)


def test_short_names_and_look_alikes_are_not_secret() -> None:
    """``pin`` matches only ``pin``; ``token_type``, ``shipping``, ``spin`` are kept."""
    document = {"token_type": "bearer", "shipping": "fast", "spin": 3, "pinned": True}
    assert redact_json(document) is None
    assert redact_json({"PIN": 1234, "spin": 3}) == ({"PIN": MARKER, "spin": 3}, ["PIN"])


def test_every_kind_of_value_under_a_secret_name_is_replaced() -> None:
    """Numbers, booleans, objects and arrays become the marker; null, an empty string and
    empty containers are left as they are (nothing to hide)."""
    document = {
        "a": {"token": 1.5},
        "b": {"token": False},
        "c": {"token": {"x": 1}},
        "d": {"token": [1]},
        "e": {"token": None},
        "f": {"token": ""},
        "g": {"token": {}},
        "h": {"token": []},
    }
    redacted = redact_json(document)
    assert redacted is not None
    out, paths = redacted
    assert [out[k]["token"] for k in "abcd"] == [MARKER] * 4
    assert [out[k]["token"] for k in "efgh"] == [None, "", {}, []]
    assert paths == ["a.token", "b.token", "c.token", "d.token"]


def test_card_numbers_are_found_anywhere() -> None:
    """Spaced, hyphenated and integer card numbers go; a non-Luhn 16-digit number, a
    card number inside text and a 12-digit number stay."""
    document = {
        "note": "4111 1111 1111 1111",
        "list": ["4111-1111-1111-1111", 4111111111111111, 4111111111111112],
        "order": "4111111111111112",
        "text": "paid with 4111111111111111",
        "short": 411111111111,
    }
    assert redact_json(document) == (
        {
            "note": MARKER,
            "list": [MARKER, MARKER, 4111111111111112],
            "order": "4111111111111112",
            "text": "paid with 4111111111111111",
            "short": 411111111111,
        },
        ["note", "list[0]", "list[1]"],
    )


def test_jwts_are_found_anywhere_and_look_alikes_are_kept() -> None:
    """A JWT (even unsigned) goes; ``1.2.3``, ``a.b.c`` and ``eyJ`` text stay."""
    unsigned = "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0."
    document = {"x": [JWT, unsigned, "1.2.3", "a.b.c", "eyJust text", "eyJ.a"]}
    assert redact_json(document) == (
        {"x": [MARKER, MARKER, "1.2.3", "a.b.c", "eyJust text", "eyJ.a"]},
        ["x[0]", "x[1]"],
    )


def test_values_false_keeps_card_numbers_and_jwts() -> None:
    """Shapes are looked for only with ``values``; names still count."""
    redactor = BodyRedactor(values=False)
    assert redact_json({"a": CARD, "b": JWT}, redactor) is None
    assert redact_json({"a": CARD, "token": "t"}, redactor) == (
        {"a": CARD, "token": MARKER},
        ["token"],
    )


def test_defaults_false_keeps_the_default_names() -> None:
    """Without defaults only the user paths (and shapes) count."""
    redactor = BodyRedactor(fields=["ssn"], defaults=False)
    assert redact_json({"password": "p", "ssn": "1"}, redactor) == (
        {"password": "p", "ssn": MARKER},
        ["ssn"],
    )
    assert BodyRedactor(defaults=False, values=False).redact(b'{"password": "p"}', JSON) is None


@pytest.mark.parametrize(
    ("pattern", "document", "expected"),
    [
        ("card.number", {"card": {"number": 1, "brand": "v"}, "number": 2}, ["card.number"]),
        (
            "items.sku",
            {"items": [{"sku": 1}, {"sku": 2}, {"x": 3}]},
            ["items[0].sku", "items[1].sku"],
        ),
        ("*.ssn", {"a": {"ssn": 1}, "ssn": 2, "b": {"c": {"ssn": 3}}}, ["a.ssn"]),
        (
            "**.ssn",
            {"a": {"ssn": 1}, "ssn": 2, "b": {"c": {"ssn": 3}}},
            ["a.ssn", "ssn", "b.c.ssn"],
        ),
        ("a.**.z", {"a": {"z": 1, "b": {"c": {"z": 2}}}, "z": 3}, ["a.z", "a.b.c.z"]),
        ("a.*", {"a": {"x": 1, "y": {"z": 2}}, "b": {"x": 3}}, ["a.x", "a.y"]),
        ("Card", {"card": 1, "Card": 2}, ["Card"]),
        ("ssn", [{"ssn": 1}, {"x": {"ssn": 2}}], ["[0].ssn"]),
    ],
)
def test_user_paths(pattern: str, document: Any, expected: list[str]) -> None:
    """Segments are exact keys from the root; ``*`` is one key, ``**`` any number;
    arrays are transparent."""
    redacted = redact_json(document, BodyRedactor(fields=[pattern], values=False))
    assert redacted is not None
    assert redacted[1] == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([""], "empty pattern"),
        (["a..b"], "empty segment"),
        ([".a"], "empty segment"),
        (["a."], "empty segment"),
        (["a.b*"], "whole segments"),
        ("card.number", "not the string"),
        ([3], "must be a string"),
    ],
)
def test_bad_paths_are_refused_at_construction(fields: Any, message: str) -> None:
    """The message says what is wrong, for the caller's configuration error."""
    with pytest.raises(ValueError, match=message):
        BodyRedactor(fields=fields)


def test_the_other_arguments_are_checked() -> None:
    """``unparseable``, ``marker`` and ``max_decoded`` are validated."""
    with pytest.raises(ValueError, match="'redact' or 'keep'"):
        BodyRedactor(unparseable="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="marker"):
        BodyRedactor(marker="")
    with pytest.raises(ValueError, match="max_decoded"):
        BodyRedactor(max_decoded=0)


def test_repr_shows_the_configuration() -> None:
    """``repr`` tells an operator what is redacted."""
    assert repr(BodyRedactor(fields=["card.number"], unparseable="keep")) == (
        "BodyRedactor(fields=['card.number'], defaults=True, values=True, "
        "unparseable='keep', marker='[REDACTED]', max_decoded=67108864)"
    )


def test_path_format_for_top_level_arrays_and_scalars() -> None:
    """Indexes print as ``[i]``; a secret top-level scalar is ``$``."""
    assert redact_json([1, 2, 3, {"password": "p"}]) == (
        [1, 2, 3, {"password": MARKER}],
        ["[3].password"],
    )
    assert redact_json([[CARD]]) == ([[MARKER]], ["[0][0]"])
    assert redact_json(CARD) == (MARKER, ["$"])
    assert redact_json(JWT) == (MARKER, ["$"])
    assert redact_json("hello") is None
    assert redact_json(42) is None


def test_at_most_100_paths_are_reported() -> None:
    """Then one entry counts the rest; all 250 values are still replaced."""
    redacted = redact_json([{"token": str(i)} for i in range(250)])
    assert redacted is not None
    document, paths = redacted
    assert len(paths) == 101
    assert paths[:2] == ["[0].token", "[1].token"]
    assert paths[99] == "[99].token"
    assert paths[100] == "… 150 more"
    assert all(item == {"token": MARKER} for item in document)


def test_paths_never_hold_values() -> None:
    """Neither the marker's replacement nor a secret appears in the paths."""
    redacted = redact_json({"a": [CARD], "password": "hunter2"})
    assert redacted is not None
    assert redacted[1] == ["a[0]", "password"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/problem+json",
        "application/vnd.api+json;v=2",
        "text/json",
    ],
)
def test_json_content_types(content_type: str) -> None:
    """Parameters and case do not matter; any ``+json`` counts."""
    assert redact_json({"password": "p"}, content_type=content_type) == (
        {"password": MARKER},
        ["password"],
    )


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/octet-stream", "multipart/form-data", "image/png"]
)
def test_other_types_have_no_rules(content_type: str) -> None:
    """Their bytes are kept as they are, even if they look like JSON or do not parse."""
    redactor = BodyRedactor()
    assert redactor.redact(b'{"password": "p"}', content_type) is None
    assert redactor.redact(b'{"password": ', content_type) is None


def test_no_content_type_is_json_when_it_looks_like_json() -> None:
    """A first non-blank ``{`` or ``[`` makes it JSON; anything else is kept."""
    redactor = BodyRedactor()
    result = redactor.redact(b' \n {"password": "p"}', None)
    assert result == BodyRedaction(data=b'{"password":"[REDACTED]"}', paths=["password"])
    assert redactor.redact(b'[{"token": "t"}]', "") is not None
    assert redactor.redact(b"password=p", None) is None
    assert redactor.redact(b'"4111111111111111"', None) is None
    assert redactor.redact(b"{ not json, no token", None) == BodyRedaction(UNPARSEABLE, [], True)
    # Nothing in it that any rule could match: stored as it is, without being parsed.
    assert redactor.redact(b"{ not json", None) is None


def test_an_empty_body_is_kept() -> None:
    """Nothing to hide, nothing to parse."""
    assert BodyRedactor().redact(b"", JSON) is None


def test_a_body_without_secrets_is_kept_byte_for_byte() -> None:
    """None means: store the original bytes (spacing, key order, number spelling)."""
    assert BodyRedactor().redact(b'{ "b" : 1.50, "a": [1e2] }', JSON) is None


def test_a_redacted_body_is_re_encoded_compactly() -> None:
    """orjson's compact form; non-ASCII text stays UTF-8."""
    result = BodyRedactor().redact('{ "name" : "Zoë",\n "token": "t" }'.encode(), JSON)
    assert result is not None
    assert result.data == '{"name":"Zoë","token":"[REDACTED]"}'.encode()


def test_a_custom_marker() -> None:
    """The marker is used in JSON as is, and percent-encoded in forms."""
    redactor = BodyRedactor(marker="<hidden>")
    assert redact_json({"token": "t"}, redactor) == ({"token": "<hidden>"}, ["token"])
    result = redactor.redact(b"token=t", FORM)
    assert result is not None
    assert result.data == b"token=%3Chidden%3E"


@pytest.mark.parametrize(
    "body",
    [
        b'{"password": "p"',
        b"{'password': 'p'}",
        b'{"token": 1,}',
        b'\xff\xfe{"secret"',
        b'{"pin": 1e400}',
    ],
)
def test_malformed_json_is_unparseable(body: bytes) -> None:
    """Replaced whole by default when a rule could match in it; kept with
    ``unparseable="keep"``."""
    assert BodyRedactor().redact(body, JSON) == BodyRedaction(
        data=UNPARSEABLE, paths=[], unparseable=True
    )
    assert BodyRedactor(unparseable="keep").redact(body, JSON) is None


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b'{"Pass_Word": "p"}', ["Pass_Word"]),
        (b'{"P-I-N": "1234"}', ["P-I-N"]),
        (b'{"n": "4111-1111 1111-1111"}', ["n"]),
        (b'{"n": 4111111111111111}', ["n"]),
        (b'{"t": "eyJhbGciOiJIUzI1NiJ9.e30.sig"}', ["t"]),
        (b'{"\\u0070assword": "p"}', ["password"]),
    ],
)
def test_the_byte_prefilter_never_hides_a_secret(body: bytes, found: list[str]) -> None:
    """Every spelling the walk would take still reaches the walk."""
    result = BodyRedactor().redact(body, JSON)
    assert result is not None and result.paths == found


def test_escaped_accents_alone_do_not_make_a_body_parsed() -> None:
    """Python's json.dumps escapes every non-ASCII character by default: such a body,
    without secrets, is not parsed for its escapes (it is left malformed here, so that a
    parse would show as the unparseable marker)."""
    body = b'{"name": "Zo\\u00eb \\u00c5ngstr\\u00f6m", "mark": "\\u2713", "cut": '
    assert BodyRedactor().redact(body, JSON) is None
    assert BodyRedactor().redact(body + b'"\\u0041"', JSON) is not None  # an ASCII one is


def test_names_with_other_letters_are_found_escaped_too() -> None:
    """A name given with letters beyond ASCII: any escape may spell it."""
    redactor = BodyRedactor(fields=["**.pässwort"])
    result = redactor.redact(b'{"p\\u00e4sswort": "geheim"}', JSON)
    assert result is not None and result.paths == ["pässwort"]


def test_names_compare_in_ascii_lower_case_only() -> None:
    """As the byte prefilter folds them: a Kelvin sign is not a K, so ``to\u212aen`` is
    not ``token``, whether or not something else in the body makes it parsed."""
    kelvin = '{"to\u212aen": "x"}'.encode()
    assert BodyRedactor().redact(kelvin, JSON) is None
    parsed = BodyRedactor().redact(kelvin[:-1] + b', "token": "y"}', JSON)
    assert parsed is not None and parsed.paths == ["token"]


def test_a_body_no_rule_can_match_is_not_parsed() -> None:
    """Digits inside a text or a float's fraction, short names inside words: nothing to
    parse for."""
    body = b'{"shipping": "fast", "note": "card 4111 1111 1111 1111", "x": 0.41111111111111111}'
    assert BodyRedactor().redact(body, JSON) is None
    assert BodyRedactor().redact(body[:-1], JSON) is None  # malformed, yet harmless


def test_a_truncated_json_body_is_unparseable() -> None:
    """A body cut anywhere inside a document does not parse."""
    body = orjson.dumps({"items": [{"password": "p", "n": 1}] * 10})
    redactor = BodyRedactor()
    for end in (24, len(body) // 2, len(body) - 1):
        result = redactor.redact(body[:end], JSON)
        assert result is not None
        assert result.unparseable


def test_integers_beyond_64_bits_are_kept_exactly() -> None:
    """orjson reads them as floats; the stdlib keeps them as they are."""
    body = b'{"big": 123456789012345678901234567890, "neg": -9223372036854775809, "password": "p"}'
    result = BodyRedactor().redact(body, JSON)
    assert result is not None
    assert json.loads(result.data) == {
        "big": 123456789012345678901234567890,
        "neg": -9223372036854775809,
        "password": MARKER,
    }


def test_what_only_the_stdlib_reads_is_still_redacted() -> None:
    """A byte-order mark or a lone surrogate makes orjson refuse; the stdlib reads it and
    the output is still valid JSON."""
    redactor = BodyRedactor()
    result = redactor.redact(b'\xef\xbb\xbf{"token": "t", "n": "Zo\xc3\xab"}', JSON)
    assert result is not None
    assert json.loads(result.data) == {"token": MARKER, "n": "Zoë"}
    result = redactor.redact(b'{"token": "t", "s": "\\ud800"}', JSON)
    assert result is not None
    assert result.data == b'{"token":"[REDACTED]","s":"\\ud800"}'


@pytest.mark.parametrize("depth", [300, 2_000, 100_000])
def test_deep_nesting_is_handled_without_crashing(depth: int) -> None:
    """Deep documents are walked without recursion; too deep for either parser or writer
    is unparseable, never an exception."""
    body = b'{"a":' * depth + b'{"password": "p"}' + b"}" * depth
    result = BodyRedactor().redact(body, JSON)
    assert result is not None
    if not result.unparseable:
        assert b'"p"' not in result.data
        assert json.loads(result.data) is not None
    deep_array = b"[" * depth + b'"4111111111111111"' + b"]" * depth
    result = BodyRedactor().redact(deep_array, JSON)
    assert result is not None
    assert b"4111" not in result.data


def test_a_moderately_deep_document_is_redacted_not_replaced() -> None:
    """300 levels parse with orjson, and are written back even though orjson would not
    write them."""
    body = b'{"a":' * 300 + b'{"password": "p", "n": 1}' + b"}" * 300
    result = BodyRedactor().redact(body, JSON)
    assert result is not None
    assert not result.unparseable
    assert result.paths == [".".join(["a"] * 300 + ["password"])]
    assert result.data == b'{"a":' * 300 + b'{"password":"[REDACTED]","n":1}' + b"}" * 300


@pytest.mark.parametrize(
    ("encoding", "wbits"),
    [
        ("gzip", 16 + zlib.MAX_WBITS),
        ("X-GZIP", 16 + zlib.MAX_WBITS),
        ("deflate", zlib.MAX_WBITS),
        ("Deflate", -zlib.MAX_WBITS),
    ],
)
def test_compressed_bodies_stay_compressed_the_same_way(encoding: str, wbits: int) -> None:
    """The stored bytes decompress (same container) to the redacted JSON; a compressed
    body without secrets is kept as it is."""
    redactor = BodyRedactor()
    body = deflate(b'{"user": "ann", "password": "hunter2"}', wbits)
    result = redactor.redact(body, JSON, encoding)
    assert result is not None
    assert not result.unparseable
    assert inflate(result.data, wbits) == b'{"user":"ann","password":"[REDACTED]"}'
    assert result.paths == ["password"]
    assert redactor.redact(deflate(b'{"user": "ann"}', wbits), JSON, encoding) is None


def test_several_gzip_members_are_one_body() -> None:
    """Concatenated gzip members are read as one stream."""
    body = gzip.compress(b'{"user": "ann", ') + gzip.compress(b'"token": "t"}')
    result = BodyRedactor().redact(body, JSON, "gzip")
    assert result is not None
    assert gzip.decompress(result.data) == b'{"user":"ann","token":"[REDACTED]"}'


def test_compressed_form_bodies() -> None:
    """A gzip form body comes back gzip, with the form marker."""
    result = BodyRedactor().redact(gzip.compress(b"user=ann&password=x"), FORM, "gzip")
    assert result is not None
    assert gzip.decompress(result.data) == b"user=ann&password=%5BREDACTED%5D"


def test_compressed_json_without_content_type_is_sniffed_after_decompression() -> None:
    """The first byte looked at is the decompressed one."""
    result = BodyRedactor().redact(gzip.compress(b'{"token": "t"}'), None, "gzip")
    assert result is not None
    assert gzip.decompress(result.data) == b'{"token":"[REDACTED]"}'
    assert BodyRedactor().redact(gzip.compress(b"plain text"), None, "gzip") is None


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_an_encoding_we_cannot_undo_is_unparseable(encoding: str) -> None:
    """For a body with rules; a body without a content type is kept (nothing says it is
    JSON)."""
    redactor = BodyRedactor()
    assert redactor.redact(b"\x1b\x00\x00", JSON, encoding) == BodyRedaction(UNPARSEABLE, [], True)
    assert redactor.redact(b"\x1b\x00\x00", FORM, encoding) == BodyRedaction(UNPARSEABLE, [], True)
    assert BodyRedactor(unparseable="keep").redact(b"\x1b", JSON, encoding) is None
    assert redactor.redact(b"\x1b\x00\x00", None, encoding) is None
    assert redactor.redact(b"\x1b\x00\x00", "image/png", encoding) is None


@pytest.mark.parametrize("encoding", ["identity", "", " IDENTITY "])
def test_identity_is_no_encoding(encoding: str) -> None:
    """The bytes are read as they are."""
    assert BodyRedactor().redact(b'{"token": "t"}', JSON, encoding) is not None


def test_a_corrupt_or_truncated_compressed_body_is_unparseable() -> None:
    """Bad bytes, a cut stream and trailing garbage all count as unreadable."""
    good = gzip.compress(b'{"token": "t"}')
    redactor = BodyRedactor()
    for body in (b"not gzip at all", good[: len(good) // 2], good + b"junk"):
        result = redactor.redact(body, JSON, "gzip")
        assert result is not None
        assert result.unparseable
    cut = zlib.compress(b'{"token": "t"}')[:-3]
    result = redactor.redact(cut, JSON, "deflate")
    assert result is not None
    assert result.unparseable


def test_decompression_is_bounded() -> None:
    """A body that inflates beyond ``max_decoded`` is unparseable, and no more than that
    is ever inflated."""
    bomb = gzip.compress(b'{"a": "' + b"x" * 10_000_000 + b'"}')
    assert len(bomb) < 20_000
    small = BodyRedactor(max_decoded=1_000_000)
    result = small.redact(bomb, JSON, "gzip")
    assert result == BodyRedaction(UNPARSEABLE, [], True)
    assert (
        BodyRedactor(max_decoded=1_000_000, unparseable="keep").redact(bomb, JSON, "gzip") is None
    )
    assert small.redact(gzip.compress(b'{"token": "t"}'), JSON, "gzip") is not None
    exact = b'{"token": "t"}'
    assert (
        BodyRedactor(max_decoded=len(exact)).redact(gzip.compress(exact), JSON, "gzip") is not None
    )
    assert BodyRedactor(max_decoded=len(exact) - 1).redact(gzip.compress(exact), JSON, "gzip") == (
        BodyRedaction(UNPARSEABLE, [], True)
    )


def test_a_decompression_bomb_costs_no_more_memory_than_the_bound() -> None:
    """50 MB of zeros in 50 kB of gzip: at most about ``max_decoded`` is ever inflated."""
    bomb = gzip.compress(b"[" + b"0," * 25_000_000 + b"0]")
    tracemalloc.start()
    try:
        result = BodyRedactor(max_decoded=1_000_000).redact(bomb, JSON, "gzip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == BodyRedaction(UNPARSEABLE, [], True)
    assert peak < 5_000_000


def test_an_oversized_compressed_body_without_content_type_is_sniffed_by_its_start() -> None:
    """What was inflated before giving up still tells JSON from anything else."""
    redactor = BodyRedactor(max_decoded=1000)
    json_bomb = gzip.compress(b'{"a": "' + b"x" * 5000 + b'"}')
    text_bomb = gzip.compress(b"x" * 5000)
    assert redactor.redact(json_bomb, None, "gzip") == BodyRedaction(UNPARSEABLE, [], True)
    assert redactor.redact(text_bomb, None, "gzip") is None


def test_form_bodies() -> None:
    """Secret field names (JSON normalisation and suffixes), card numbers and JWTs go,
    with the percent-encoded marker; everything else keeps its bytes."""
    body = (
        f"user=ann&new_password=p%26q&Client-Secret=s&cc=4111+1111+1111+1111&t={JWT}"
        "&token_type=bearer&&flag&empty=&shipping=x&caf%E9=1"
    ).encode("latin-1") + b"&raw=\xe9"
    result = BodyRedactor().redact(body, FORM)
    assert result is not None
    marker = "%5BREDACTED%5D"
    assert (
        result.data
        == (
            f"user=ann&new_password={marker}&Client-Secret={marker}&cc={marker}&t={marker}"
            "&token_type=bearer&&flag&empty=&shipping=x&caf%E9=1"
        ).encode("latin-1")
        + b"&raw=\xe9"
    )
    assert result.paths == ["new_password", "Client-Secret", "cc", "t"]


def test_form_bodies_use_the_last_plain_segment_of_user_paths() -> None:
    """``card.number`` and ``**.ssn`` make ``number`` and ``ssn`` secret form fields."""
    redactor = BodyRedactor(fields=["card.number", "**.ssn", "a.*"], defaults=False)
    result = redactor.redact(b"number=1&SSN=2&a=3&password=4", FORM)
    assert result is not None
    assert result.data == b"number=%5BREDACTED%5D&SSN=%5BREDACTED%5D&a=3&password=4"
    assert result.paths == ["number", "SSN"]


def test_a_form_body_without_secrets_is_kept() -> None:
    """None: store the original bytes."""
    assert BodyRedactor().redact(b"a=1&b=2&token_type=x", FORM) is None


def test_form_paths_are_capped() -> None:
    """At most 100 field names, then a count."""
    body = "&".join(f"x{i}_token=x" for i in range(120)).encode()
    result = BodyRedactor().redact(body, FORM)
    assert result is not None
    assert len(result.paths) == 101
    assert result.paths[-1] == "… 20 more"


def test_the_default_names_are_normalised() -> None:
    """The defaults are spelled as compared: lower case, no separators."""
    for name in DEFAULT_SECRET_FIELDS:
        assert name == name.lower()
        assert not set(name) & set("_-.")


# Property: planted secrets never survive, and nothing else changes.

SAFE_KEYS = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
"""No secret name, user path (``ssn``) or planted key can be spelled with these."""
SAFE_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10).filter(
    lambda s: not s[:1].isdigit() and not s.startswith("eyJ")
)
SAFE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    SAFE_TEXT,
)
DOCUMENTS = st.recursive(
    SAFE_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(SAFE_KEYS, children, max_size=4)
    ),
    max_leaves=25,
)
SECRET_KEYS = ["password", "new_password", "clientSecret", "X-Api-Key", "id_token", "pin", "CVV"]


def luhn_complete(digits: str) -> str:
    """``digits`` followed by the Luhn check digit."""
    for check in "0123456789":
        candidate = digits + check
        total = 0
        for position, char in enumerate(reversed(candidate)):
            digit = int(char) * (2 if position % 2 else 1)
            total += digit - 9 if digit > 9 else digit
        if total % 10 == 0:
            return candidate
    raise AssertionError("unreachable")


@st.composite
def card_numbers(draw: st.DrawFn) -> str | int:
    digits = luhn_complete(
        draw(st.sampled_from("3456")) + draw(st.text("0123456789", min_size=14, max_size=14))
    )
    style = draw(st.sampled_from(["plain", "spaces", "hyphens", "int"]))
    if style == "int":
        return int(digits)
    groups = [digits[i : i + 4] for i in range(0, 16, 4)]
    return {"plain": digits, "spaces": " ".join(groups), "hyphens": "-".join(groups)}[style]


@st.composite
def jwts(draw: st.DrawFn) -> str:
    segment = st.text("ABCDEFabcdef0123456789_-", min_size=4, max_size=20)
    return f"eyJ{draw(segment)}.{draw(segment)}.{draw(st.one_of(st.just(''), segment))}"


def containers(document: Any) -> list[Any]:
    """Every dict and list in ``document``, in a fixed order."""
    found: list[Any] = []
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            found.append(node)
            stack.extend(node)
    return found


def scalars(document: Any) -> list[Any]:
    """Every value in ``document`` that is not a container (keys are not values)."""
    out: list[Any] = []
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            out.append(node)
    return out


@settings(max_examples=200, deadline=None)
@given(DOCUMENTS, st.data())
def test_planted_secrets_never_survive_and_nothing_else_changes(
    original: Any, data: st.DataObject
) -> None:
    """Plant secrets at random places (under secret keys, under a user path, as card
    numbers or JWTs under harmless keys or in arrays); the output holds none of them,
    and equals the document with exactly those values replaced."""
    document = {"root": original}
    expected = orjson.loads(orjson.dumps(document))
    places = list(zip(containers(document), containers(expected), strict=True))
    planted: list[Any] = []
    for number in range(data.draw(st.integers(0, 6), label="plants")):
        node, twin = data.draw(st.sampled_from(places), label="where")
        how = data.draw(st.sampled_from(["name", "path", "card", "jwt"]), label="how")
        if how == "name":
            value: Any = data.draw(
                st.sampled_from(
                    [
                        f"secret-{number}-value",
                        5 * 10**12 + number,  # beyond the harmless integers
                        {"x": f"nested-secret-{number}"},
                    ]
                )
            )
        elif how == "path":
            value = f"ssn-{number}-value"
        elif how == "card":
            value = data.draw(card_numbers())
        else:
            value = data.draw(jwts())
        planted.append(value)
        key = {
            "name": data.draw(st.sampled_from(SECRET_KEYS)),
            "path": "ssn",
            "card": f"card{number}",
            "jwt": f"jwt{number}",
        }[how]
        if not isinstance(node, list):
            node[key] = value
            twin[key] = MARKER
        elif how in ("card", "jwt"):
            node.append(value)
            twin.append(MARKER)
        else:  # a name says nothing inside an array: plant an object there
            node.append({key: value})
            twin.append({key: MARKER})

    result = BodyRedactor(fields=["**.ssn"]).redact(orjson.dumps(document), JSON)
    if not planted:
        assert result is None
        return
    assert result is not None
    assert not result.unparseable
    output = orjson.loads(result.data)
    assert output == expected
    survivors = set(map(repr, scalars(output)))
    for value in planted:
        for piece in scalars(value):
            assert repr(piece) not in survivors
