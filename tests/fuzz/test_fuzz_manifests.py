"""Fuzzing the manifest loader: any text, any mutation of the users' manifests.

Properties: load_documents and from_manifest return objects or raise ManifestError
with a one-line message, nothing else; apply_defaults and validate never raise and
every FieldError prints as Kubernetes' `path: Type...`; an object that validates
survives to_manifest -> from_manifest (and a trip through YAML and JSON text) equal.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import (
    MAX_VALUES,
    ManifestError,
    from_manifest,
    load_documents,
    to_manifest,
)
from ebpflb.validation import apply_defaults, validate
from tests.fuzz.common import (
    assert_field_error,
    assert_one_line,
    counted,
    field_names,
    fuzz_settings,
    manifest_docs,
    manifest_texts,
    manifests_dir,
)

pytestmark = pytest.mark.unit

FIELDS = field_names()
LOADER = "loader: load_documents + from_manifest"
MUTATIONS = "loader: mutated users' manifests"

# ------------------------------------------------------------------ the checks


def check_text(target: str, text: str) -> None:
    """The whole path of `ebpflb apply`'s reading: text -> documents -> objects."""
    with counted(target) as t:
        try:
            docs = load_documents(text)
        except ManifestError as e:
            assert type(e) is ManifestError
            assert_one_line(str(e))
            t.outcomes["text refused"] += 1
            return
        t.outcomes["text loaded"] += 1
        for doc in docs:
            assert isinstance(doc, dict)
            check_doc_inner(t.outcomes, doc)


def check_doc(target: str, doc: Any) -> None:
    with counted(target) as t:
        check_doc_inner(t.outcomes, doc)


def check_doc_inner(outcomes: Any, doc: Any) -> None:
    warnings: list[str] = []
    try:
        obj = from_manifest(doc, warnings)
    except ManifestError as e:
        assert type(e) is ManifestError
        assert_one_line(str(e))
        outcomes["document refused"] += 1
        return
    for w in warnings:
        assert_one_line(w)
    check_object(outcomes, obj)


def check_object(outcomes: Any, obj: pb.Object) -> None:
    """Defaults and validation never raise; a valid object round-trips."""
    apply_defaults(obj)
    errors = validate(obj)
    for e in errors:
        assert_field_error(e)
    if errors:
        outcomes["object invalid"] += 1
        return
    outcomes["object valid, round-tripped"] += 1
    manifest = to_manifest(obj)
    assert from_manifest(manifest) == obj, manifest
    for text in (yaml.safe_dump(manifest), json.dumps(manifest)):
        (doc,) = load_documents(text)
        assert from_manifest(doc) == obj, text


# ------------------------------------------------------------------ any text

YAML_TOKENS = [
    *("- ", ": ", "\n", "  ", "    ", "\t", "{", "}", "[", "]", ", ", "'", '"', "#", "? "),
    *("&a ", "&b ", "*a", "*b", "<<: ", "---\n", "...\n", "|\n", ">-\n", "%YAML 1.1\n"),
    *("!!int ", "!!float ", "!!str ", "!!binary ", "!!timestamp ", "!!set ", "!!omap "),
    *("!!python/object:os.system ", "!custom ", "\\u0000", "\\ud800", "\x85", "\u2028", "\ufeff"),
    *("apiVersion: v1\n", "kind: Service\n", "kind: Pod\n", "kind: List\n", "items:\n"),
    *("metadata:\n", "  name: a\n", "spec:\n", "ports:\n", "port: ", "targetPort: ", "labels:\n"),
    *("80", "-1", "0x1F", "0o17", "1e400", ".inf", "-.nan", "1_000", "1:30", "2024-13-45"),
    *("null", "~", "true", "yes", "on", "=", "<<", "None", "ClusterIP", "10.96.0.1"),
]
yamlish = st.lists(st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=4)), max_size=40).map(
    "".join
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["v1", "Service", "Pod", "Node", "EndpointSlice", "List"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def jsonish(draw: st.DrawFn) -> str:
    text = json.dumps(draw(json_values))
    for _ in range(draw(st.integers(0, 3))):  # then break it a little
        i = draw(st.integers(0, len(text)))
        text = (
            text[:i]
            + draw(st.sampled_from(["", "{", "]", ",", '"', "\\", "1e999", "NaN"]))
            + (text[i + draw(st.integers(0, 3)) :])
        )
    return text


any_unicode = st.text(st.characters(codec=None, exclude_categories=[]), max_size=200)
binary = st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape"))


@st.composite
def deeply_nested(draw: st.DrawFn) -> str:
    n = draw(st.integers(1, 20_000))
    shape = draw(st.sampled_from(["[", "{", "{a:", "- ", "a:\n", '{"a":', "[{"]))
    if shape == "a:\n":
        return "".join("  " * i + f"k{i}:\n" for i in range(min(n, 3000)))
    closing = {"[": "]", "{": "}", "{a:": "}", '{"a":': "}", "[{": "}]"}.get(shape, "")
    return shape * n + "1" + closing * n * draw(st.sampled_from([0, 1]))


@st.composite
def huge_numbers(draw: st.DrawFn) -> str:
    digits = draw(st.integers(1, 12_000))
    number = draw(
        st.sampled_from(
            [
                "1" + "0" * digits,
                "-" + "9" * digits,
                "0x" + "f" * digits,
                "0b" + "1" * digits,
                "1" + ":59" * min(digits, 3000),
                "1e" + "9" * min(digits, 50),
                "0." + "0" * digits + "1",
            ]
        )
    )
    where = draw(
        st.sampled_from(
            [
                "a: {n}",
                '{{"a": {n}}}',
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  ports:\n"
                "  - port: {n}\n    targetPort: {n}\n",
                '{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "p"}}, '
                '"spec": {{"terminationGracePeriodSeconds": {n}}}}}',
            ]
        )
    )
    return where.format(n=number)


@st.composite
def alias_bombs(draw: st.DrawFn) -> tuple[str, int]:
    """A YAML billion laughs: levels of anchors, each aliasing the one below fanout
    times; returns the text and how many values it expands to."""
    levels = draw(st.integers(1, 12))
    fanout = draw(st.integers(2, 10))
    lines = ["l0: &l0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    text = "\n".join(lines) + "\n"
    # Every level's list and its items, all levels being values of the top mapping.
    sizes = [2]
    for _ in range(levels):
        sizes.append(1 + fanout * sizes[-1])
    return text, 1 + 1 + sum(sizes)


@given(text=yamlish | jsonish() | any_unicode | binary)
@fuzz_settings(200)
@example(text="[" * 100_000)
@example(text="&a [*a]")
@example(text="&a {kind: List, items: [*a]}")
@example(text="kind: List\nitems: 5")
@example(text='{"a": ' + "9" * 5000 + "}")
@example(text="a: 2024-13-45")
@example(text='a: "\\U0011ffff"')
@example(text='apiVersion: v1\nkind: Service\nmetadata:\n  name: "\\ud800"\n')
def test_any_text_loads_or_is_one_clear_error(text: str) -> None:
    check_text(LOADER, text)


@given(text=deeply_nested() | huge_numbers())
@fuzz_settings(60)
def test_deep_nesting_and_huge_numbers_are_clear_errors(text: str) -> None:
    check_text(LOADER, text)


@given(bomb=alias_bombs())
@fuzz_settings(60)
def test_alias_bombs_are_refused_beyond_the_bound(bomb: tuple[str, int]) -> None:
    text, expanded = bomb
    with counted("loader: alias bombs") as t:
        if expanded > MAX_VALUES:
            with pytest.raises(ManifestError) as e:
                load_documents(text)
            assert "aliases" in str(e.value)
            assert_one_line(str(e.value))
            t.outcomes["refused"] += 1
        else:
            (doc,) = load_documents(text)
            assert isinstance(doc, dict)
            t.outcomes["loaded"] += 1


# ------------------------------------------------------------------ the users' manifests, mutated

EDGE_INTS = [0, -1, 1, 53, 80, 65535, 65536, 30000, 32767, 32768, 2**31 - 1, 2**31, -(2**31) - 1]
EDGE_INTS += [2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
EDGE_STRINGS = ["", " ", "80", "-1", "1e3", "0x50", "80.0", "TCP", "UDP", "SCTP", "None"]
EDGE_STRINGS += ["ClusterIP", "NodePort", "LoadBalancer", "Local", "Cluster", "ClientIP"]
EDGE_STRINGS += ["10.96.0.10", "10.96.0.0", "10.0.0.1", "256.1.1.1", "10.244.1.0/24", "http"]
EDGE_STRINGS += ["a\nb", "Bad_Name", "x" * 300, "ünïcödé", "\ud800", "\x00", "\u2028", "True"]
EDGE_STRINGS += ["2024-01-01T00:00:00Z", "2024-13-45T00:00:00Z", "v1", "discovery.k8s.io/v1"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from([math.nan, math.inf, 80.0, 80.5, -0.0]),
    st.text(max_size=12),
    st.sampled_from(EDGE_STRINGS),
)
keys = st.sampled_from(FIELDS) | st.text(max_size=8) | st.integers() | st.booleans() | st.none()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)

Path_ = tuple[Any, ...]


def _paths(doc: Any) -> list[Path_]:
    out: list[Path_] = [()]

    def walk(v: Any, p: Path_) -> None:
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, child in items:
            out.append((*p, k))
            walk(child, (*p, k))

    walk(doc, ())
    return out


def _get(doc: Any, p: Path_) -> Any:
    for k in p:
        doc = doc[k]
    return doc


OPS = ["drop", "duplicate", "retype", "number", "string", "null", "wrap", "unwrap", "add", "kind"]


@st.composite
def mutated(draw: st.DrawFn, docs: list[dict[str, Any]]) -> Any:
    """A user's manifest with one to four structural mutations."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(docs)))
    for _ in range(draw(st.integers(1, 4))):
        p = draw(st.sampled_from(_paths(doc)))
        op = draw(st.sampled_from(OPS))
        if op == "kind" and isinstance(doc, dict):
            doc["kind"] = draw(st.sampled_from(["Service", "Pod", "Node", "EndpointSlice", "List"]))
            api = ["v1", "discovery.k8s.io/v1", "apps/v1"]
            doc["apiVersion"] = draw(st.sampled_from(api))
            continue
        if op == "add":
            target = _get(doc, p)
            if isinstance(target, dict):
                target[draw(keys)] = draw(values)
            elif isinstance(target, list):
                target.insert(draw(st.integers(0, len(target))), draw(values))
            continue
        old = _get(doc, p)
        new: Any
        if op == "drop":
            new = _DROP
        elif op == "duplicate":
            if isinstance(old, list) and old:
                new = [*old, *old[: draw(st.integers(1, len(old)))]]
            else:  # the same value under another field's name
                target = _get(doc, p[:-1]) if p else None
                if isinstance(target, dict):
                    target[draw(st.sampled_from(FIELDS))] = copy.deepcopy(old)
                continue
        elif op == "retype":
            new = draw(values.filter(functools.partial(_other_type, old)))
        elif op == "number":
            new = draw(st.sampled_from(EDGE_INTS) | st.floats() | st.integers())
        elif op == "string":
            new = str(old) if draw(st.booleans()) else draw(st.sampled_from(EDGE_STRINGS))
        elif op == "null":
            new = None
        elif op == "wrap":
            new = [old] if draw(st.booleans()) else {draw(keys): old}
        else:  # unwrap: a list's first item, or a map's first value
            seq = list(old.values()) if isinstance(old, dict) else old
            new = seq[0] if isinstance(seq, list) and seq else old
        if not p:
            doc = {} if new is _DROP else new
        elif new is _DROP:
            del _get(doc, p[:-1])[p[-1]]
        else:
            _get(doc, p[:-1])[p[-1]] = new
    return doc


_DROP = object()


def _other_type(old: Any, new: Any) -> bool:
    return type(new) is not type(old)


def _users_docs() -> list[dict[str, Any]]:
    if not manifests_dir().is_dir():
        pytest.skip(f"no users' manifests in {manifests_dir()} (set EBPFLB_MANIFESTS)")
    return manifest_docs()


@pytest.fixture(scope="module")
def users_docs() -> list[dict[str, Any]]:
    return _users_docs()


def test_users_manifests_are_valid_and_round_trip(users_docs: list[dict[str, Any]]) -> None:
    """The starting point of the mutations: every document loads, validates, round-trips."""
    for text in manifest_texts():
        check_text("loader: users' manifests as they are", text)
    for doc in users_docs:
        obj = from_manifest(doc)
        apply_defaults(obj)
        assert validate(obj) == []


@given(data=st.data())
@fuzz_settings(250)
def test_mutated_manifests_load_or_are_one_clear_error(
    users_docs: list[dict[str, Any]], data: st.DataObject
) -> None:
    doc = data.draw(mutated(users_docs))
    check_doc(MUTATIONS, doc)
    # The same document as the user would have written it, YAML or JSON.
    for dump in (yaml.safe_dump, json.dumps):
        try:
            text = dump(doc)
        except (ValueError, TypeError, yaml.YAMLError):
            continue  # not writable as text (a key json cannot have...): not the loader's input
        check_text(MUTATIONS + " (as text)", text)


@st.composite
def text_edits(draw: st.DrawFn, texts: list[str]) -> str:
    """A user's manifest file with a few edits a hand can make: a line dropped,
    doubled, indented with a tab, a token pasted in."""
    lines = draw(st.sampled_from(texts)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "double", "tab", "dedent", "paste", "cut"]))
        if op == "drop":
            del lines[i]
        elif op == "double":
            lines.insert(i, lines[i])
        elif op == "tab":
            lines[i] = "\t" + lines[i].lstrip(" ")
        elif op == "dedent":
            lines[i] = lines[i].lstrip(" ")
        elif op == "paste":
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + draw(st.sampled_from(YAML_TOKENS)) + lines[i][j:]
        else:
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j]
    return "".join(lines)


@given(data=st.data())
@fuzz_settings(200)
def test_hand_edited_manifest_files_load_or_are_one_clear_error(
    users_docs: list[dict[str, Any]], data: st.DataObject
) -> None:
    check_text("loader: hand-edited manifest files", data.draw(text_edits(manifest_texts())))


# ------------------------------------------------------------------ valid objects round-trip

NAMES = st.sampled_from(["a", "web", "my-service", "x-1", "n" * 63])
LABELS = st.dictionaries(
    st.sampled_from(["app", "tier", "app.kubernetes.io/name", "k8s-app"]),
    st.sampled_from(["", "web", "MyApp", "a.b_c-d", "1"]),
    max_size=3,
)
IPS = st.sampled_from(["10.244.0.5", "10.244.1.3", "192.168.56.11", "0.0.0.0"])


@st.composite
def service_manifests(draw: st.DrawFn) -> dict[str, Any]:
    typ = draw(st.sampled_from([None, "ClusterIP", "NodePort"]))
    n = draw(st.integers(0, 3))
    ports = []
    for i in range(n):
        p: dict[str, Any] = {"port": draw(st.integers(1, 65535))}
        if n > 1 or draw(st.booleans()):
            p["name"] = f"p{i}"
        p["protocol"] = ["TCP", "UDP"][i % 2] if n > 1 else draw(st.sampled_from(["TCP", "UDP"]))
        if draw(st.booleans()):
            p["targetPort"] = draw(st.integers(1, 65535) | st.sampled_from(["http", "dns-tcp"]))
        if typ == "NodePort" and draw(st.booleans()):
            p["nodePort"] = 30000 + i
        ports.append(p)
    spec: dict[str, Any] = {"ports": ports, "selector": draw(LABELS)}
    if typ:
        spec["type"] = typ
    if n == 0 or draw(st.booleans()):
        spec["clusterIP"] = draw(
            st.sampled_from(["None", "10.96.0.10"] if typ != "NodePort" else [""])
        )
    if typ == "NodePort":
        spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
        if spec["externalTrafficPolicy"] == "Local" and draw(st.booleans()):
            spec["healthCheckNodePort"] = 31000
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
        if draw(st.booleans()):
            spec["sessionAffinityConfig"] = {
                "clientIP": {"timeoutSeconds": draw(st.integers(1, 86400))}
            }
    meta: dict[str, Any] = {"name": draw(NAMES), "labels": draw(LABELS)}
    if draw(st.booleans()):
        meta["annotations"] = {"note": draw(st.text(max_size=20))}
    if draw(st.booleans()):
        meta["creationTimestamp"] = "2024-05-01T10:00:00Z"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


@st.composite
def pod_manifests(draw: st.DrawFn) -> dict[str, Any]:
    ports = [
        {"name": name, "containerPort": draw(st.integers(1, 65535)), "protocol": proto}
        for name, proto in draw(
            st.lists(st.sampled_from([("http", "TCP"), ("dns", "UDP"), ("m", "TCP")]), unique=True)
        )
    ]
    status: dict[str, Any] = {"phase": draw(st.sampled_from(["Running", "Pending"]))}
    if draw(st.booleans()):
        status["podIP"] = draw(IPS)
    if draw(st.booleans()):
        status["conditions"] = [
            {"type": "Ready", "status": draw(st.sampled_from(["True", "False"]))}
        ]
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "nginx", "ports": ports}]}
    if draw(st.booleans()):
        spec["nodeName"] = "node1"
    if draw(st.booleans()):
        spec["terminationGracePeriodSeconds"] = draw(st.integers(0, 2**40))
    meta: dict[str, Any] = {"name": draw(NAMES), "labels": draw(LABELS), "namespace": "other"}
    if draw(st.booleans()):
        meta["deletionGracePeriodSeconds"] = draw(st.integers(0, 2**40))
        meta["deletionTimestamp"] = "2024-05-01T10:00:30Z"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


@st.composite
def node_manifests(draw: st.DrawFn) -> dict[str, Any]:
    addresses = [
        {"type": "InternalIP", "address": draw(IPS)},
        {"type": "Hostname", "address": "n1"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": draw(NAMES), "labels": draw(LABELS)},
        "spec": {"podCIDR": draw(st.sampled_from(["10.244.1.0/24", "10.244.0.0/16"]))},
        "status": {"addresses": addresses[: draw(st.integers(0, 2))]},
    }


@st.composite
def slice_manifests(draw: st.DrawFn) -> dict[str, Any]:
    endpoints = [
        {
            "addresses": [draw(IPS)],
            "conditions": {"ready": draw(st.booleans()), "serving": True},
            "nodeName": "node1",
            "targetRef": {"kind": "Pod", "name": "p"},
        }
        for _ in range(draw(st.integers(0, 3)))
    ]
    port: dict[str, Any] = {"name": "http", "protocol": "TCP"}
    if draw(st.booleans()):
        port["port"] = draw(st.integers(1, 65535))
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": draw(NAMES), "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [port],
    }


@given(doc=service_manifests() | pod_manifests() | node_manifests() | slice_manifests())
@fuzz_settings(150)
def test_generated_manifests_validate_and_round_trip(doc: dict[str, Any]) -> None:
    check_doc("loader: generated manifests", doc)
    check_text("loader: generated manifests (as YAML)", yaml.safe_dump(doc))
