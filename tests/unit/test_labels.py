"""Label selectors: parsing, matching, printing; label key and value rules."""

from __future__ import annotations

import pytest

from ebpflb.labels import (
    Operator,
    Requirement,
    Selector,
    SelectorError,
    is_label_key,
    is_label_value,
    label_key_errors,
    label_value_errors,
    matches_map,
    parse_selector,
)

pytestmark = pytest.mark.unit

WEB = {"app": "web", "tier": "frontend", "version": "3"}
DB = {"app": "db", "tier": "backend"}
BARE: dict[str, str] = {}

# (selector, does it select WEB, DB, BARE)
MATCHES = [
    pytest.param("", True, True, True, id="empty-selects-everything"),
    pytest.param("   ", True, True, True, id="blank-selects-everything"),
    pytest.param("app=web", True, False, False, id="equals"),
    pytest.param("app==web", True, False, False, id="double-equals"),
    pytest.param("app = web", True, False, False, id="spaces-around-operator"),
    pytest.param("app!=web", False, True, True, id="not-equals-missing-label-matches"),
    pytest.param("app in (web,db)", True, True, False, id="in"),
    pytest.param("app in ( web , db )", True, True, False, id="in-with-spaces"),
    pytest.param("app in (db)", False, True, False, id="in-one-value"),
    pytest.param("app notin (web)", False, True, True, id="notin-missing-label-matches"),
    pytest.param("version", True, False, False, id="exists"),
    pytest.param("!version", False, True, True, id="does-not-exist"),
    pytest.param("! version", False, True, True, id="does-not-exist-space"),
    pytest.param("app=web,tier=frontend", True, False, False, id="and"),
    pytest.param("app=web,tier=backend", False, False, False, id="and-contradiction"),
    pytest.param("app,!version", False, True, False, id="exists-and-not-exists"),
    pytest.param("tier in (backend),app notin (web)", False, True, False, id="in-and-notin"),
    pytest.param("version>2", True, False, False, id="greater-than"),
    pytest.param("version<3", False, False, False, id="less-than-strict"),
    pytest.param("app>2", False, False, False, id="greater-than-non-integer-label"),
    pytest.param("app=", False, False, False, id="equals-empty-value"),
    pytest.param("app in (in,notin)", False, False, False, id="keywords-as-values"),
    pytest.param("app=in", False, False, False, id="keyword-as-exact-value"),
]


@pytest.mark.parametrize(("text", "web", "db", "bare"), MATCHES)
def test_selector_matches(text: str, web: bool, db: bool, bare: bool) -> None:
    sel = parse_selector(text)
    assert (sel.matches(WEB), sel.matches(DB), sel.matches(BARE)) == (web, db, bare)


def test_empty_label_value_matches_equals_empty() -> None:
    assert parse_selector("app=").matches({"app": ""})
    assert parse_selector("app in (a,)").matches({"app": ""})


def test_prefixed_keys() -> None:
    sel = parse_selector("app.kubernetes.io/name=MyApp")
    assert sel.matches({"app.kubernetes.io/name": "MyApp"})
    assert not sel.matches({"app.kubernetes.io/name": "myapp"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a=b", (Requirement("a", Operator.EQUALS, ("b",)),), id="equals"),
        pytest.param("a==b", (Requirement("a", Operator.EQUALS, ("b",)),), id="double-equals"),
        pytest.param("a!=b", (Requirement("a", Operator.NOT_EQUALS, ("b",)),), id="not-equals"),
        pytest.param("a in (y,x,y)", (Requirement("a", Operator.IN, ("x", "y")),), id="in-sorted"),
        pytest.param("a notin (x)", (Requirement("a", Operator.NOT_IN, ("x",)),), id="notin"),
        pytest.param("a", (Requirement("a", Operator.EXISTS),), id="exists"),
        pytest.param("!a", (Requirement("a", Operator.DOES_NOT_EXIST),), id="not-exists"),
        pytest.param(
            "z=1,a=2",
            (Requirement("a", Operator.EQUALS, ("2",)), Requirement("z", Operator.EQUALS, ("1",))),
            id="sorted-by-key",
        ),
    ],
)
def test_parse_structure(text: str, expected: tuple[Requirement, ...]) -> None:
    assert parse_selector(text) == Selector(expected)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("b==x, a", "a,b=x", id="normalised"),
        pytest.param("a in (y, x)", "a in (x,y)", id="in"),
        pytest.param("a notin (x),!b", "a notin (x),!b", id="notin-not-exists"),
        pytest.param("a!=, c>5, d<-1", "a!=,c>5,d<-1", id="empty-and-numbers"),
    ],
)
def test_str_round_trips(text: str, canonical: str) -> None:
    sel = parse_selector(text)
    assert str(sel) == canonical
    assert parse_selector(str(sel)) == sel


# (text, the end of the SelectorError message)
BAD = [
    pytest.param("a=b,", 'expected a label key or "!", found end of string', id="trailing-comma"),
    pytest.param(
        ",a=b", 'expected a label key or "!", found "," at position 0', id="leading-comma"
    ),
    pytest.param(
        "a b",
        'expected an operator ("=", "==", "!=", "in", "notin", ">" or "<"), '
        'found "b" at position 2',
        id="missing-operator",
    ),
    pytest.param("a in b", 'expected "(", found "b" at position 5', id="in-without-paren"),
    pytest.param("a in (b", 'expected "," or ")", found end of string', id="unclosed-paren"),
    pytest.param("a in ()", '"in" and "notin" need at least one value', id="empty-set"),
    pytest.param(
        "a in (b c)", 'expected "," or ")", found "c" at position 8', id="set-missing-comma"
    ),
    pytest.param("a=b=c", 'expected "," or end of string, found "=" at position 3', id="double-op"),
    pytest.param("a=(b)", 'expected a value, found "(" at position 2', id="paren-value"),
    pytest.param("!", "expected a label key, found end of string", id="bare-bang"),
    pytest.param(
        "a=b)", 'expected "," or end of string, found ")" at position 3', id="stray-paren"
    ),
    pytest.param("a>b", '">" needs an integer value, not "b"', id="gt-non-integer"),
    pytest.param(
        "a=b c",
        'expected "," or end of string, found "c" at position 4',
        id="space-in-value",
    ),
    pytest.param(
        "-a=b",
        "key \"-a\": name part must consist of alphanumeric characters, '-', '_' or '.', and "
        "must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
        "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
        id="bad-key",
    ),
    pytest.param(
        "a=-b",
        'value "-b" for key "a": a valid label must be an empty string or consist of alphanumeric '
        "characters, '-', '_' or '.', and must start and end with an alphanumeric character "
        "(e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is "
        "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
        id="bad-value",
    ),
    pytest.param(
        "a in (ok,x" + "y" * 63 + ")",
        f'value "x{"y" * 63}" for key "a": must be no more than 63 characters',
        id="long-value-in-set",
    ),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_bad_selectors(text: str, problem: str) -> None:
    with pytest.raises(SelectorError) as e:
        parse_selector(text)
    assert str(e.value) == f'invalid label selector "{text}": {problem}'
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        pytest.param({"app": "web"}, WEB, True, id="subset"),
        pytest.param({"app": "web", "tier": "frontend"}, WEB, True, id="all-keys"),
        pytest.param({"app": "web"}, DB, False, id="other-value"),
        pytest.param({"missing": ""}, WEB, False, id="missing-key-even-for-empty-value"),
        pytest.param({}, WEB, True, id="empty-map-is-vacuously-true"),
        pytest.param({}, BARE, True, id="empty-map-empty-labels"),
    ],
)
def test_matches_map(selector: dict[str, str], labels: dict[str, str], expected: bool) -> None:
    assert matches_map(selector, labels) is expected
    assert Selector.from_map(selector).matches(labels) is expected


def test_from_map_prints_as_selector() -> None:
    assert str(Selector.from_map({"tier": "x", "app": "web"})) == "app=web,tier=x"


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        pytest.param("app", True, id="plain"),
        pytest.param("app.kubernetes.io/name", True, id="prefixed"),
        pytest.param("My_Key.1", True, id="mixed-case-underscore-dot"),
        pytest.param("a" * 63, True, id="63-chars"),
        pytest.param("a" * 64, False, id="64-chars"),
        pytest.param("", False, id="empty"),
        pytest.param("/name", False, id="empty-prefix"),
        pytest.param("Example.com/name", False, id="uppercase-prefix"),
        pytest.param("a/b/c", False, id="two-slashes"),
        pytest.param("name-", False, id="ends-with-dash"),
        pytest.param("has space", False, id="space"),
    ],
)
def test_label_keys(key: str, valid: bool) -> None:
    assert is_label_key(key) is valid
    assert (label_key_errors(key) == []) is valid


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        pytest.param("", True, id="empty"),
        pytest.param("MyApp", True, id="mixed-case"),
        pytest.param("1.2_3-x", True, id="punctuation-inside"),
        pytest.param("v" * 63, True, id="63-chars"),
        pytest.param("v" * 64, False, id="64-chars"),
        pytest.param("a/b", False, id="slash"),
        pytest.param("_a", False, id="leading-underscore"),
    ],
)
def test_label_values(value: str, valid: bool) -> None:
    assert is_label_value(value) is valid
    assert (label_value_errors(value) == []) is valid


def test_key_error_messages() -> None:
    assert label_key_errors("/x") == ["prefix part must be non-empty"]
    assert label_key_errors("x/") == [
        "name part must be non-empty",
        "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
        "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', "
        "regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
    ]
    assert label_key_errors("a" * 64) == ["name part must be no more than 63 characters"]
