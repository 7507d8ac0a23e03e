"""The loader's crashes and unclear errors the fuzzing found, one case each (fixed in
ebpflb/objects.py and ebpflb/labels.py). Before the fix, each raised something other
than ManifestError, or a message of several lines, or one naming no field."""

from __future__ import annotations

from typing import Any

import pytest

from ebpflb.labels import SelectorError, parse_selector
from ebpflb.objects import MAX_VALUES, ManifestError, from_manifest, load_documents
from tests.fuzz.common import assert_one_line

pytestmark = pytest.mark.unit


def refused(text: str) -> str:
    with pytest.raises(ManifestError) as e:
        load_documents(text)
    assert type(e.value) is ManifestError
    assert_one_line(str(e.value))
    return str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # RecursionError
        ("[" * 100_000, "not valid YAML or JSON: nested too deeply"),
        ("a: " + "[" * 5000 + "]" * 5000, "not valid YAML or JSON: nested too deeply"),
        ("".join("  " * i + f"k{i}:\n" for i in range(3000)), "nested too deeply"),
        # ValueError from int(): Python's 4300-digit limit
        ('{"a": ' + "9" * 5000 + "}", "not valid YAML or JSON: a number has more than 4300 digits"),
        ("a: " + "9" * 5000, "a number has more than 4300 digits at line 1, column 4"),
        # ValueError, KeyError, IndexError, AttributeError from PyYAML's constructors
        ("a: 2024-13-45", 'not a valid !!timestamp: "2024-13-45": month must be in 1..12'),
        ("!!timestamp ", 'not a valid !!timestamp: "" at line 1, column 1'),
        ("!!bool x", 'not a valid !!bool: "x" at line 1, column 1'),
        ("!!int", 'not a valid !!int: ""'),
        ("a: !!float x", 'not a valid !!float: "x": could not convert string to float'),
        # RecursionError in unpacking Lists: a value that contains itself
        ("&a [*a]", "a value contains itself"),
        ("&a {kind: List, items: [*a]}", "a value contains itself"),
        # TypeError: a List's items not a list
        ("kind: List\nitems: 5", "items: Invalid value: a List's items must be a list"),
        ('{"kind": "ServiceList", "items": true}', "a ServiceList's items must be a list"),
        # Messages of several lines (PyYAML's excerpt and caret)
        ("a: 'b", "while scanning a quoted scalar at line 1, column 4 found unexpected end"),
        ("a:\n\tb: 1", "found character '\\t' that cannot start any token at line 2, column 1"),
    ],
    ids=lambda v: v[:30] if isinstance(v, str) else None,
)
def test_bad_text_is_one_clear_manifest_error(text: str, message: str) -> None:
    assert message in refused(text)


def test_an_alias_bomb_is_refused_not_expanded() -> None:
    lines = ["l0: &l0 [x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    message = refused("\n".join(lines))
    assert message == f"too large: more than {MAX_VALUES} values once YAML aliases are expanded"


def test_aliases_within_the_bound_still_load() -> None:
    (doc,) = load_documents("a: &a {x: 1}\nb: *a\nc: [*a, *a]\n")
    assert doc == {"a": {"x": 1}, "b": {"x": 1}, "c": [{"x": 1}, {"x": 1}]}


def test_deep_json_lists_of_manifests_unpack_without_recursion() -> None:
    svc = '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}'
    docs = load_documents("[" * 900 + svc + "]" * 900)
    assert [d["metadata"]["name"] for d in docs] == ["a"]


SVC: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}


def with_(path: str, value: Any) -> dict[str, Any]:
    """SVC with one field set: "spec.ports" -> {"spec": {"ports": value}}."""
    doc: dict[str, Any] = {**SVC, "metadata": dict(SVC["metadata"])}
    *parents, last = path.split(".")
    d = doc
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        # was "'int' object is not iterable"
        (with_("metadata", 5), "metadata: Invalid value: 5: must be a mapping"),
        (with_("spec.ports", [5]), "spec.ports[0]: Invalid value: 5: must be a mapping"),
        # was a multi-line protobuf message listing every field
        (with_("spec", "x"), 'spec: Invalid value: "x": must be a mapping'),
        (with_("spec.ports", {"port": 80}), "spec.ports: Invalid value: dict: must be a list"),
        # were "Failed to parse spec field: Failed to parse ports field: ..."
        (
            with_("spec.ports", [{"port": 80.5}]),
            "spec.ports[0].port: Invalid value: 80.5: must be an integer",
        ),
        (
            with_("spec.ports", [{"port": "http"}]),
            'spec.ports[0].port: Invalid value: "http": must be an integer',
        ),
        (
            with_("spec.ports", [{"port": 2**40}]),
            "spec.ports[0].port: Invalid value: 1099511627776: must be an integer between",
        ),
        (
            with_("spec.ports", [{"port": 80, "targetPort": 80.5}]),
            "spec.ports[0].targetPort: Invalid value: 80.5: must be a number or a name",
        ),
        (
            with_("spec.ports", [{"port": 80, "targetPort": 2**40}]),
            "spec.ports[0].targetPort: Invalid value: 1099511627776: must be an integer between",
        ),
        (with_("spec.type", True), "spec.type: Invalid value: true: must be a string"),
        (
            with_("spec.clusterIPs", "10.96.0.1"),
            'spec.clusterIPs: Invalid value: "10.96.0.1": must be a list',
        ),
        (with_("metadata.labels", {"a": 1}), "metadata.labels: Invalid value: 1: must be a string"),
        (with_("metadata.labels", [1]), "metadata.labels: Invalid value: list: must be a mapping"),
        (with_("metadata.name", b"ab"), "metadata.name: Invalid value: bytes: must be a string"),
        (
            with_("metadata.name", "\ud800"),
            'metadata.name: Invalid value: "\\ud800": must be valid Unicode',
        ),
        (
            with_("metadata.creationTimestamp", "yesterday"),
            'metadata.creationTimestamp: Invalid value: "yesterday": must be an RFC 3339 time',
        ),
        # was ValueError from str() of an integer of more than 4300 digits
        ({**SVC, "apiVersion": 10**5000}, "apiVersion: Invalid value"),
        (
            with_("spec.ports", [{"port": int("f" * 5000, 16)}]),
            "spec.ports[0].port: Invalid value: a number out of range: must be an integer",
        ),
        # names and kinds with line breaks, quoted as Go's %q does
        ({**SVC, "kind": "Ser\nvice"}, 'kind: Unsupported value: "Ser\\nvice"'),
        ({**SVC, "apiVersion": "v1\n"}, 'apiVersion: Invalid value: "v1\\n": Service is v1'),
        (
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "endpoints": [{"conditions": {"ready": "yes"}}],
            },
            'endpoints[0].conditions.ready: Invalid value: "yes": must be true or false',
        ),
    ],
    ids=lambda v: None,
)
def test_wrong_types_are_one_clear_error_naming_the_field(
    doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(ManifestError) as e:
        from_manifest(doc)
    assert_one_line(str(e.value))
    assert str(e.value).startswith(message), str(e.value)


def test_what_protobuf_took_is_still_taken() -> None:
    """The checks refuse only what parsing refused before, with a clearer message."""
    doc = with_("spec.ports", [{"port": "80", "targetPort": 8080}, {"port": 81.0, "name": "b"}])
    obj = from_manifest(doc)
    assert [p.port for p in obj.service.spec.ports] == [80, 81]
    # An unquoted YAML time (PyYAML makes it a datetime) is a time, as in Kubernetes.
    text = "apiVersion: v1\nkind: Pod\nmetadata:\n  creationTimestamp: 2024-01-01T00:00:00Z"
    (d,) = load_documents(text)
    assert from_manifest(d).pod.metadata.creation_timestamp.seconds == 1704067200


def test_unknown_field_warnings_are_one_line() -> None:
    warnings: list[str] = []
    from_manifest(with_("spec.a\nb", 1), warnings)
    assert warnings == ['unknown field "spec.a\\nb"']


def test_selector_errors_are_one_line() -> None:
    with pytest.raises(SelectorError) as e:
        parse_selector("a\nb in")
    assert_one_line(str(e.value))
    assert str(e.value).startswith('invalid label selector "a\\nb in": ')
