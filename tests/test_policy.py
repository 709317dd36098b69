"""Policy: ordered rules, early and late decisions, and a repr that reads as config."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from asgi_audit import ConfigError, Level, Policy, Rule, make_rule
from asgi_audit.capture.policy import PENDING, StatusRange


def _routed(template: str, endpoint: Any = None) -> dict[str, Any]:
    return {"route": SimpleNamespace(path_format=template), "endpoint": endpoint}


def test_first_matching_rule_decides() -> None:
    """Rules are ordered; an exclusion listed first wins over a later catch-all."""
    policy = Policy([make_rule("None", routes=["/health"]), make_rule("Metadata")])
    assert policy.decide_early("GET", "/health").level is Level.NONE  # type: ignore[union-attr]
    assert policy.decide_early("GET", "/x").level is Level.METADATA  # type: ignore[union-attr]


def test_no_match_gives_the_default_level() -> None:
    """An exchange no rule matches gets the policy's default."""
    policy = Policy([make_rule(routes=["/a"])], default=Level.METADATA)
    assert policy.decide_early("GET", "/b").level is Level.METADATA  # type: ignore[union-attr]


def test_methods_narrow_a_rule() -> None:
    """A rule with methods matches only those methods."""
    policy = Policy([make_rule(methods=["post", "PUT"])])
    assert policy.decide_early("POST", "/x").level is Level.REQUEST_RESPONSE  # type: ignore[union-attr]
    assert policy.decide_early("GET", "/x").level is Level.NONE  # type: ignore[union-attr]


def test_globs_match_the_path_at_arrival() -> None:
    """Glob rules are decided from the path alone, without waiting for routing."""
    policy = Policy([make_rule(routes=["/admin/*"])])
    assert policy.decide_early("GET", "/admin/users/3").level is Level.REQUEST_RESPONSE  # type: ignore[union-attr]
    assert policy.decide_early("GET", "/public").level is Level.NONE  # type: ignore[union-attr]


def test_templates_defer_only_paths_that_could_match() -> None:
    """A template rule defers paths sharing its literal prefix and rejects others at once."""
    policy = Policy([make_rule(routes=["/orders/{order_id}"])])
    assert policy.decide_early("GET", "/orders/7") is PENDING
    assert policy.decide_early("GET", "/users/7").level is Level.NONE  # type: ignore[union-attr]


def test_late_decision_uses_the_route_template() -> None:
    """After routing, the declared template decides, not the raw path."""
    policy = Policy([make_rule(routes=["/orders/{order_id}"])])
    assert policy.decide_late({}, "GET", "/orders/7", "/orders/{order_id}").level is (
        Level.REQUEST_RESPONSE
    )
    assert policy.decide_late({}, "GET", "/orders/7/lines", "/orders/{order_id}/lines").level is (
        Level.NONE
    )
    assert policy.decide_late({}, "GET", "/orders/7", None).level is Level.NONE


def test_parameterless_template_compares_the_path_exactly() -> None:
    """A template without parameters such as /health is decided at arrival."""
    policy = Policy([make_rule("None", routes=["/health"]), make_rule()])
    assert policy.decide_early("GET", "/health").level is Level.NONE  # type: ignore[union-attr]
    assert policy.decide_early("GET", "/healthz").level is Level.REQUEST_RESPONSE  # type: ignore[union-attr]


def test_marker_rule_reads_the_endpoint_attribute() -> None:
    """A marked rule gives the level set by @audited on the routed endpoint."""
    from asgi_audit import audited

    @audited(level="Request")
    def endpoint() -> None:
        """A marked endpoint."""

    policy = Policy([Rule(marked=True)])
    assert policy.decide_early("GET", "/x") is PENDING
    scope = _routed("/x", endpoint)
    assert policy.decide_late(scope, "GET", "/x", "/x").level is Level.REQUEST
    assert policy.decide_late(_routed("/y"), "GET", "/y", "/y").level is Level.NONE


def test_status_filter_downgrades_after_the_response_starts() -> None:
    """statuses keep the rule's level for listed codes and give `otherwise` to the rest."""
    rule = make_rule(statuses=["4xx", 500, "502-504"], otherwise="Metadata")
    assert rule.level_for_status(404) is Level.REQUEST_RESPONSE
    assert rule.level_for_status(500) is Level.REQUEST_RESPONSE
    assert rule.level_for_status(503) is Level.REQUEST_RESPONSE
    assert rule.level_for_status(501) is Level.METADATA
    assert rule.level_for_status(200) is Level.METADATA


def test_sampling_keeps_about_the_given_fraction() -> None:
    """sample=0.25 keeps roughly a quarter of matching exchanges (bounded loop)."""
    policy = Policy([make_rule(sample=0.25)])
    kept = sum(
        policy.decide_early("GET", "/x").level is Level.REQUEST_RESPONSE  # type: ignore[union-attr]
        for _ in range(4000)
    )
    assert 700 < kept < 1300
    never = Policy([make_rule(sample=0.0)])
    assert never.decide_early("GET", "/x").level is Level.NONE  # type: ignore[union-attr]


def test_repr_reads_like_configuration() -> None:
    """repr(policy) tells an operator what is audited."""
    policy = Policy(
        [
            make_rule("None", routes=["/health"]),
            Rule(marked=True),
            make_rule(
                "RequestResponse",
                routes=["/orders/{order_id}"],
                methods=["POST"],
                statuses=["5xx"],
                otherwise="Metadata",
                sample=0.5,
            ),
        ]
    )
    assert repr(policy) == (
        "Policy(exclude(routes=['/health']), marked(), audit('RequestResponse', "
        "routes=['/orders/{order_id}'], methods=['POST'], statuses=['5xx'], "
        "otherwise='Metadata', sample=0.5), default='None')"
    )


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"level": "Everything"}, "level"),
        ({"routes": ["orders"]}, "routes"),
        ({"routes": "/orders"}, "routes"),
        ({"methods": ["FETCH"]}, "methods"),
        ({"statuses": ["6xx"]}, "statuses"),
        ({"statuses": ["404-400"]}, "statuses"),
        ({"sample": 1.5}, "sample"),
        ({"sample": "often"}, "sample"),
        ({"otherwise": "some"}, "otherwise"),
    ],
)
def test_bad_rule_words_fail_naming_the_parameter(kwargs: dict[str, Any], parameter: str) -> None:
    """Every malformed rule parameter fails at construction with its name in the message."""
    with pytest.raises(ConfigError) as caught:
        make_rule(**kwargs)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter}: ")


def test_status_range_parses_the_three_forms() -> None:
    """'4xx', '404' and '200-299' are the accepted status forms."""
    assert (StatusRange.parse("4xx", "s").low, StatusRange.parse("4xx", "s").high) == (400, 499)
    assert 404 in StatusRange.parse(404, "s")
    assert 250 in StatusRange.parse("200-299", "s")
    assert 300 not in StatusRange.parse("200-299", "s")
