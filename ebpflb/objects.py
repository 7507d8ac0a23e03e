"""The API's kinds and their Kubernetes manifest form: YAML/JSON documents <-> protobuf objects."""

from __future__ import annotations

import datetime
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.labels import go_quote


@dataclass(frozen=True)
class Kind:
    """One kind of stored object."""

    name: str  # Service, as in manifests
    api_version: str  # v1
    field: str  # its field in the pb.Object oneof
    message: type[Message]
    namespaced: bool
    aliases: tuple[str, ...]  # what `ebpflb get` accepts besides the name


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("Service", "v1", "service", pb.Service, True, ("services", "svc")),
        Kind("Pod", "v1", "pod", pb.Pod, True, ("pods", "po")),
        Kind("Node", "v1", "node", pb.Node, False, ("nodes", "no")),
        Kind(
            "EndpointSlice",
            "discovery.k8s.io/v1",
            "endpoint_slice",
            pb.EndpointSlice,
            True,
            ("endpointslices", "endpointslice", "endpoints", "ep", "eps"),
        ),
    )
}
_BY_FIELD = {k.field: k for k in KINDS.values()}
DEFAULT_NAMESPACE = "default"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# The most values a YAML or JSON text may hold once its aliases are expanded: a
# few anchors can otherwise stand for billions of values (the "billion laughs").
MAX_VALUES = 1_000_000


class ManifestError(ValueError):
    """A document that is not a valid manifest; the message names the field."""


def kind_named(word: str) -> Kind:
    """The kind for a name or alias, case-insensitive (`svc`, `Service`, `pods`)."""
    w = word.lower()
    for k in KINDS.values():
        if w == k.name.lower() or w in k.aliases:
            return k
    known = ", ".join(sorted(k.name for k in KINDS.values()))
    raise ManifestError(f'unknown kind "{word}" (known: {known})')


def kind_of(obj: pb.Object) -> Kind:
    field = obj.WhichOneof("kind")
    if field is None:
        raise ManifestError("object has no kind")
    return _BY_FIELD[field]


def message_of(obj: pb.Object) -> Any:
    """The Service/Pod/Node/EndpointSlice inside an Object."""
    return getattr(obj, kind_of(obj).field)


def wrap(msg: Message) -> pb.Object:
    """An Object holding a copy of msg."""
    for k in KINDS.values():
        if isinstance(msg, k.message):
            obj = pb.Object()
            getattr(obj, k.field).CopyFrom(msg)
            return obj
    raise TypeError(f"not an API object: {type(msg).__name__}")


class Key(NamedTuple):
    """Where an object is stored: kind, namespace ("" for Nodes) and name. A tuple, so
    that hashing and comparing one (millions of times in a bulk write) runs in C."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{ns}{self.name}"


def key_of(obj: pb.Object) -> Key:
    k = kind_of(obj)
    meta = getattr(obj, k.field).metadata  # message_of(obj), without asking the kind again
    ns = (meta.namespace or DEFAULT_NAMESPACE) if k.namespaced else ""
    return Key(k.name, ns, meta.name)


# ------------------------------------------------------------------ manifests


def from_manifest(doc: Any, warnings: list[str] | None = None) -> pb.Object:
    """A Kubernetes manifest (a dict) as an Object.

    apiVersion and kind must name one of KINDS. Fields this API does not have
    (kubectl's output carries many) are left out, and each is reported in
    `warnings` as kubectl does ('unknown field "spec.foo"'). IntOrString fields
    take a bare number or a bare string, as in Kubernetes.
    """
    if not isinstance(doc, dict):
        raise ManifestError(f"a manifest must be a mapping, not {type(doc).__name__}")
    kind_word = doc.get("kind")
    if not isinstance(kind_word, str) or not kind_word:
        raise ManifestError("kind: Required value")
    kind = KINDS.get(kind_word)
    if kind is None:
        known = ", ".join(KINDS)
        raise ManifestError(
            f"kind: Unsupported value: {go_quote(kind_word)}: supported values: {known}"
        )
    api_version = doc.get("apiVersion")
    if api_version != kind.api_version:
        shown = '"None"' if api_version is None else _show(api_version)
        raise ManifestError(
            f"apiVersion: Invalid value: {shown}: {kind.name} is {kind.api_version}"
        )
    unknown: list[str] = []
    clean = _clean(doc, kind.message.DESCRIPTOR, "", unknown)  # type: ignore[arg-type]
    msg = kind.message()
    try:
        json_format.ParseDict(clean, msg)
    except json_format.ParseError as e:
        raise ManifestError(one_line(str(e))) from None
    if warnings is not None:
        warnings.extend(f"unknown field {go_quote(u)}" for u in unknown)
    return wrap(msg)


def to_manifest(obj: pb.Object) -> dict[str, Any]:
    """An Object as the manifest `kubectl get -o yaml` would print."""
    kind = kind_of(obj)
    msg = message_of(obj)
    d = json_format.MessageToDict(msg)
    d["apiVersion"] = kind.api_version
    d["kind"] = kind.name
    _flatten_int_or_string(d, msg.DESCRIPTOR)
    # The usual key order: apiVersion, kind, metadata, then the rest.
    head: dict[str, Any] = {k: d.pop(k) for k in ("apiVersion", "kind", "metadata") if k in d}
    return {**head, **d}


def load_documents(text: str) -> list[dict[str, Any]]:
    """The manifests in a YAML stream or a JSON document; a `kind: List` is unpacked."""
    try:
        if text.lstrip().startswith(("{", "[")):
            docs: list[Any] = [json.loads(text)]
        else:
            docs = [d for d in yaml.load_all(text, Loader=_SafeLoader) if d is not None]
    except RecursionError:
        raise ManifestError("not valid YAML or JSON: nested too deeply") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: JSON's errors
        raise ManifestError(f"not valid YAML or JSON: {_scalar_error(e)}") from None
    _check_size(docs)
    out: list[dict[str, Any]] = []
    for d in _unpack(docs):
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest must be a mapping, not {type(d).__name__}")
        out.append(d)
    return out


def _scalar_error(e: Exception) -> str:
    """The message of a parser's error, one line; Python's limit on digits said plainly."""
    if "integer string conversion" in str(e):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return one_line(str(e))


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a scalar its tag cannot hold (`!!int x`, `!!bool ""`,
    `2024-13-45`, an integer of more than 4300 digits) is a YAMLError that says where,
    not whatever the tag's constructor happened to raise."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError) as e:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            value = node.value if isinstance(node.value, str) else ""
            shown = go_quote(value[:40] + ("..." if len(value) > 40 else ""))
            problem = f"not a valid {tag}: {shown}"
            if isinstance(e, ValueError):  # others say nothing a user can act on
                problem += f": {_scalar_error(e)}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _unpack(docs: list[Any]) -> Iterator[Any]:
    """The documents with lists and `kind: *List` flattened, in order (a loop, not a
    recursion: a JSON text may nest lists a thousand deep)."""
    stack: list[Iterator[Any]] = [iter(docs)]
    while stack:
        d = next(stack[-1], _END)
        if d is _END:
            stack.pop()
        elif isinstance(d, list):
            stack.append(iter(d))
        elif isinstance(d, dict) and isinstance(d.get("kind"), str) and d["kind"].endswith("List"):
            items = d.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"items: Invalid value: a {d['kind']}'s items must be a list")
            stack.append(iter(items))
        else:
            yield d


_END = object()


def _check_size(docs: list[Any]) -> None:
    """ManifestError when docs hold more than MAX_VALUES values with aliases expanded,
    or contain themselves (YAML's `&a [*a]`). Linear in the values actually stored."""
    sizes: dict[int, int] = {}  # id of a list or dict -> its values, aliases expanded
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(docs, False)]
    while stack:
        value, done = stack.pop()
        if done:
            children = value.values() if isinstance(value, dict) else value
            total = 1 + sum(sizes.get(id(c), 1) for c in children)
            if total > MAX_VALUES:
                raise ManifestError(
                    f"too large: more than {MAX_VALUES} values once YAML aliases are expanded"
                )
            sizes[id(value)] = total
            on_path.discard(id(value))
            continue
        if id(value) in on_path:
            raise ManifestError("not valid YAML or JSON: a value contains itself (a YAML alias)")
        if id(value) in sizes:
            continue
        on_path.add(id(value))
        stack.append((value, True))
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, False) for c in children if isinstance(c, dict | list | tuple))


# PyYAML's mark: `in "<unicode string>", line 1, column 5:` (the source line follows).
_MARK = re.compile(r'in "[^"]*", (line \d+, column \d+):?$')


def one_line(message: str) -> str:
    """A parser's multi-line message as one line. PyYAML quotes the source line after a
    mark and puts a ^ under the column: the mark becomes `at line L, column C`, the
    excerpt is dropped."""
    kept: list[str] = []
    skip_excerpt = False
    for raw in message.splitlines():
        line = raw.strip()
        if skip_excerpt or not line or set(line) == {"^"}:
            skip_excerpt = False
            continue
        if _MARK.search(line):
            line, skip_excerpt = _MARK.sub(r"at \1", line), line.endswith(":")
        kept.append(line)
    return " ".join(kept)


def _field_named(desc: Descriptor, key: str) -> FieldDescriptor | None:
    for f in desc.fields:
        if key in (f.json_name, f.name):
            return f
    return None


def _clean(value: Any, desc: Descriptor, path: str, unknown: list[str]) -> Any:
    """value (a mapping for message desc) without unknown fields, IntOrString made explicit."""
    if desc.full_name == "ebpflb.v1.IntOrString" and not isinstance(value, dict):
        if isinstance(value, int) and not isinstance(value, bool):
            _check_scalar(path, desc.fields_by_name["int_val"], value)
            return {"intVal": value}
        if isinstance(value, str):
            _check_scalar(path, desc.fields_by_name["str_val"], value)
            return {"strVal": value}
        raise ManifestError(f"{path}: Invalid value: {_show(value)}: must be a number or a name")
    if desc.full_name == "google.protobuf.Timestamp":
        if isinstance(value, datetime.datetime):  # YAML reads an unquoted time as one
            utc = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
            return utc.isoformat()
        try:
            Timestamp().FromJsonString(value)
        except (TypeError, ValueError, AttributeError):
            what = "an RFC 3339 time (2006-01-02T15:04:05Z)"
            raise ManifestError(f"{path}: Invalid value: {_show(value)}: must be {what}") from None
        return value
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: Invalid value: {_show(value)}: must be a mapping")
    out: dict[str, Any] = {}
    for key, v in value.items():
        name = key if isinstance(key, str) else _show(key)
        sub = f"{path}.{name}" if path else name
        f = _field_named(desc, key) if isinstance(key, str) else None
        if f is None:
            unknown.append(sub)
            continue
        if v is None:
            continue
        if _is_map(f):
            _check_map(sub, v)
        elif f.is_repeated:
            if not isinstance(v, list):
                raise ManifestError(f"{sub}: Invalid value: {_show(v)}: must be a list")
            if f.message_type is not None:
                v = [_clean(x, f.message_type, f"{sub}[{i}]", unknown) for i, x in enumerate(v)]
            else:
                for i, x in enumerate(v):
                    _check_scalar(f"{sub}[{i}]", f, x)
        elif f.message_type is not None:
            v = _clean(v, f.message_type, sub, unknown)
        else:
            _check_scalar(sub, f, v)
        out[key] = v
    return out


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


def _check_scalar(path: str, f: FieldDescriptor, v: Any) -> None:
    """ManifestError naming the field when v cannot be its value; what protobuf's JSON
    mapping takes (80, 80.0, "80" for a number) passes on to it."""
    problem = ""
    if f.type == FieldDescriptor.TYPE_STRING:
        problem = _text_problem(v)
    elif f.type == FieldDescriptor.TYPE_BOOL:
        problem = "" if isinstance(v, bool) else "must be true or false"
    elif f.type in _INT_RANGES:
        low, high = _INT_RANGES[f.type]
        number: Any = v
        if isinstance(v, str) and re.fullmatch(r"-?[0-9]{1,20}", v):
            number = int(v)
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            problem = "must be an integer"
        elif not low <= number <= high:
            problem = f"must be an integer between {low} and {high}"
    if problem:
        raise ManifestError(f"{path}: Invalid value: {_show(v)}: {problem}")


def _check_map(path: str, v: Any) -> None:
    """The maps (labels, annotations, selector) are of strings to strings."""
    if not isinstance(v, dict):
        raise ManifestError(f"{path}: Invalid value: {_show(v)}: must be a mapping")
    for key, value in v.items():
        for x in (key, value):
            if problem := _text_problem(x):
                raise ManifestError(f"{path}: Invalid value: {_show(x)}: {problem}")


def _text_problem(v: Any) -> str:
    """Why v cannot be a string field's value ("" when it can)."""
    if not isinstance(v, str):
        return "must be a string"
    try:
        v.encode()
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds an unpaired surrogate)"
    return ""


def _show(value: Any) -> str:
    """A wrong value in a message: a string quoted, a number or a bool as it is, anything
    else by its type (a list or a mapping may be huge)."""
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return "a number out of range"
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return type(value).__name__


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


_INT64_TYPES = (
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
)


def _flatten_int_or_string(d: Any, desc: Descriptor) -> None:
    """In a MessageToDict result, write IntOrString fields as bare values and 64-bit
    integers as numbers, not strings, as Kubernetes prints them (in place)."""
    if not isinstance(d, dict):
        return
    for f in desc.fields:
        if f.json_name not in d:
            continue
        if f.type in _INT64_TYPES:
            v64 = d[f.json_name]
            d[f.json_name] = [int(x) for x in v64] if isinstance(v64, list) else int(v64)
            continue
        if f.message_type is None or _is_map(f):
            continue
        v = d[f.json_name]
        if f.message_type.full_name == "ebpflb.v1.IntOrString":
            d[f.json_name] = v.get("intVal", v.get("strVal"))
            continue
        for item in v if isinstance(v, list) else [v]:
            _flatten_int_or_string(item, f.message_type)


def int_or_string(v: pb.IntOrString) -> int | str | None:
    """The value of an IntOrString, None when unset."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    return v.int_val if which == "int_val" else v.str_val
