"""Query-string and form-pair redaction: secret values are replaced, every other byte of
the string is kept exactly, and an untouched string comes back as the same object."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_audit.recording.redact import MARKER
from asgi_audit.recording.redact_query import (
    DEFAULT_SECRET_QUERY,
    FORM_MARKER,
    QueryRedactor,
    form_marker,
    is_card_number,
    is_jwt,
    redact_pairs,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"
DEFAULTS = frozenset(DEFAULT_SECRET_QUERY)


def test_the_default_names_are_redacted_in_any_case() -> None:
    """``API_KEY`` and ``X-Amz-Signature`` match the lower-case defaults."""
    query = "API_KEY=k1&X-Amz-Signature=abc123&page=2"
    assert QueryRedactor()(query) == (
        f"API_KEY={MARKER}&X-Amz-Signature={MARKER}&page=2",
        ["API_KEY", "X-Amz-Signature"],
    )


def test_names_are_compared_exactly_not_as_substrings() -> None:
    """``keyboard`` and ``monkey`` are not ``key``; ``code_challenge`` is not ``code``."""
    query = "keyboard=1&monkey=2&code_challenge=3&codes=4"
    result, found = QueryRedactor()(query)
    assert result is query
    assert found == []


def test_percent_encoded_names_are_decoded_before_comparing() -> None:
    """``api%5Fkey`` is ``api_key``; the name is kept as it was sent."""
    query = "api%5Fkey=s3cret&Access%5FToken=t"
    assert QueryRedactor()(query) == (
        f"api%5Fkey={MARKER}&Access%5FToken={MARKER}",
        ["api_key", "Access_Token"],
    )


def test_plus_in_a_name_is_a_space() -> None:
    """An extra name with a space matches its ``+`` spelling."""
    query = "my+secret=v&my%20secret=w&my_secret=x"
    assert QueryRedactor(["My Secret"], defaults=False)(query) == (
        f"my+secret={MARKER}&my%20secret={MARKER}&my_secret=x",
        ["my secret"],
    )


def test_extra_names_are_added_to_the_defaults() -> None:
    """``session`` is redacted beside the defaults; without defaults, ``token`` is not."""
    assert QueryRedactor(["Session"])("session=1&token=2") == (
        f"session={MARKER}&token={MARKER}",
        ["session", "token"],
    )
    assert QueryRedactor(["Session"], defaults=False)("session=1&token=2") == (
        f"session={MARKER}&token=2",
        ["session"],
    )


def test_the_rest_of_the_string_is_kept_exactly() -> None:
    """Empty pairs, a pair without ``=``, an empty value, ``;`` and encodings stay."""
    query = "a=1&&b=2&c&token=&d=%41+b;e=f&token=x&&"
    assert QueryRedactor()(query) == (
        f"a=1&&b=2&c&token=&d=%41+b;e=f&token={MARKER}&&",
        ["token"],
    )


def test_a_value_containing_equals_signs_is_replaced_whole() -> None:
    """Only the first ``=`` separates name and value."""
    assert QueryRedactor()("sig=a=b=c&x=1") == (f"sig={MARKER}&x=1", ["sig"])


def test_repeated_names_are_all_redacted_and_reported_once() -> None:
    """Every ``token`` value is replaced; the name is listed once, in first-seen order."""
    query = "token=1&a=2&key=3&token=4&KEY=5"
    assert QueryRedactor()(query) == (
        f"token={MARKER}&a=2&key={MARKER}&token={MARKER}&KEY={MARKER}",
        ["token", "key", "KEY"],
    )


def test_an_untouched_query_is_the_same_object() -> None:
    """Callers test ``is`` to know nothing changed."""
    for query in ("", "a", "a=1&b=2", "token=", "&&&"):
        result, found = QueryRedactor()(query)
        assert result is query
        assert found == []


def test_card_numbers_and_jwts_are_redacted_under_any_name() -> None:
    """A card number (``+``-grouped or ``%20``) or a JWT hides wherever it is; a
    non-Luhn 16-digit number and dotted non-tokens stay."""
    query = (
        f"ref={JWT}&cc=4111+1111+1111+1111&n=4111%201111%201111%201111"
        "&order=4111111111111112&v=1.2.3&w=a.b.c"
    )
    result, found = QueryRedactor()(query)
    assert result == (f"ref={MARKER}&cc={MARKER}&n={MARKER}&order=4111111111111112&v=1.2.3&w=a.b.c")
    assert found == ["ref", "cc", "n"]


def test_values_false_looks_at_names_only() -> None:
    """With ``values=False`` a card number under an innocent name stays."""
    query = "cc=4111111111111111&token=t"
    assert QueryRedactor(values=False)(query) == (f"cc=4111111111111111&token={MARKER}", ["token"])
    assert redact_pairs(query, frozenset(), values=False)[0] is query


def test_form_bodies_get_the_percent_encoded_marker() -> None:
    """The form marker keeps the body valid form encoding."""
    assert FORM_MARKER == "%5BREDACTED%5D"
    assert form_marker("<hidden>") == "%3Chidden%3E"
    assert redact_pairs("password=x&y=1", DEFAULTS, marker=FORM_MARKER) == (
        "password=%5BREDACTED%5D&y=1",
        ["password"],
    )


def test_a_name_test_may_replace_the_set_of_names() -> None:
    """A callable gets the decoded name as sent, not lower-cased."""
    seen: list[str] = []

    def upper_only(name: str) -> bool:
        seen.append(name)
        return name.isupper()

    assert redact_pairs("AB=1&ab=2&C%44=3", upper_only) == (
        f"AB={MARKER}&ab=2&C%44={MARKER}",
        ["AB", "CD"],
    )
    assert seen == ["AB", "ab", "CD"]


def test_card_number_shapes() -> None:
    """13 to 19 digits, single spaces or hyphens between, Luhn-valid, whole value only."""
    assert is_card_number("4111111111111111")
    assert is_card_number("4111 1111 1111 1111")
    assert is_card_number("4111-1111-1111-1111")
    assert is_card_number("378282246310005")  # 15-digit Amex test number
    assert not is_card_number("4111111111111112")  # fails Luhn
    assert not is_card_number("4111  1111 1111 1111")  # double space
    assert not is_card_number(" 4111111111111111")
    assert not is_card_number("card 4111111111111111")
    assert not is_card_number("411111111111")  # 12 digits
    assert not is_card_number("4" * 20)
    assert not is_card_number("٤١١١١١١١١١١١١١١١")  # Arabic-Indic digits are not ASCII digits


def test_jwt_shapes() -> None:
    """Three base64url segments, the first starting ``eyJ``; the signature may be empty."""
    assert is_jwt(JWT)
    assert is_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.")
    assert not is_jwt("1.2.3")
    assert not is_jwt("a.b.c")
    assert not is_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0")  # two segments
    assert not is_jwt("eyJ a.b.c")
    assert not is_jwt(f"Bearer {JWT}")


def test_the_redactor_checks_its_names_and_prints_its_configuration() -> None:
    """A bare string or an empty name is refused; ``repr`` lists the names."""
    with pytest.raises(ValueError, match="not the string 'token'"):
        QueryRedactor("token")
    with pytest.raises(ValueError, match="non-empty string"):
        QueryRedactor([""])
    assert repr(QueryRedactor(["B"], defaults=False)) == "QueryRedactor(names=['b'], values=True)"


safe_names = st.text(alphabet="abcdfghjlmqz%+", min_size=0, max_size=6)
"""Raw names that never decode to a default secret name (no letters enough to spell one,
no hex digits to percent-encode them)."""
secret_names = st.sampled_from(DEFAULT_SECRET_QUERY).flatmap(
    lambda name: st.sampled_from([name, name.upper(), name.title(), name.replace("_", "%5F")])
)
safe_values = st.text(alphabet="abcxyz019%+=/.", max_size=8).map(lambda v: "v" + v)
"""Values starting with ``v``: never a card number, never a JWT."""
pairs = st.lists(
    st.one_of(
        st.tuples(st.just("safe"), safe_names, st.text(alphabet="ab=", max_size=3), safe_values),
        st.tuples(st.just("secret"), secret_names, st.just("="), safe_values),
        st.tuples(st.just("bare"), safe_names, st.just(""), st.just("")),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(pairs)
def test_only_secret_values_change_and_everything_else_is_byte_identical(
    drawn: list[tuple[str, str, str, str]],
) -> None:
    """For any list of pairs, the output has the same pairs in the same order; the
    non-secret ones are byte-identical and the secret ones keep their raw name."""
    raw = [name + equals + value for _, name, equals, value in drawn]
    query = "&".join(raw)
    result, found = QueryRedactor()(query)
    out = result.split("&")
    assert len(out) == len(raw)
    for (kind, name, _, _), before, after in zip(drawn, raw, out, strict=True):
        if kind == "secret":
            assert after == f"{name}={MARKER}"
        else:
            assert after == before
    if not any(kind == "secret" for kind, *_ in drawn):
        assert result is query
        assert found == []
    else:
        assert found
