"""The API's kinds and their Kubernetes manifest form: YAML/JSON documents <-> protobuf objects."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ebpflb.api.v1 import registry_pb2 as pb


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


@dataclass(frozen=True, order=True)
class Key:
    """Where an object is stored: kind, namespace ("" for Nodes) and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{ns}{self.name}"


def key_of(obj: pb.Object) -> Key:
    k = kind_of(obj)
    meta = message_of(obj).metadata
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
        raise ManifestError(f'kind: Unsupported value: "{kind_word}": supported values: {known}')
    api_version = doc.get("apiVersion")
    if api_version != kind.api_version:
        raise ManifestError(
            f'apiVersion: Invalid value: "{api_version}": {kind.name} is {kind.api_version}'
        )
    unknown: list[str] = []
    clean = _clean(doc, kind.message.DESCRIPTOR, "", unknown)  # type: ignore[arg-type]
    msg = kind.message()
    try:
        json_format.ParseDict(clean, msg)
    except json_format.ParseError as e:
        raise ManifestError(str(e)) from None
    if warnings is not None:
        warnings.extend(f'unknown field "{u}"' for u in unknown)
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
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ManifestError(f"not valid YAML or JSON: {e}") from None
    out: list[dict[str, Any]] = []
    for d in _unpack(docs):
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest must be a mapping, not {type(d).__name__}")
        out.append(d)
    return out


def _unpack(docs: Iterable[Any]) -> Iterable[Any]:
    for d in docs:
        if isinstance(d, list):
            yield from _unpack(d)
        elif isinstance(d, dict) and isinstance(d.get("kind"), str) and d["kind"].endswith("List"):
            yield from _unpack(d.get("items") or [])
        else:
            yield d


def _field_named(desc: Descriptor, key: str) -> FieldDescriptor | None:
    for f in desc.fields:
        if key in (f.json_name, f.name):
            return f
    return None


def _clean(value: Any, desc: Descriptor, path: str, unknown: list[str]) -> Any:
    """value (a mapping for message desc) without unknown fields, IntOrString made explicit."""
    if desc.full_name == "ebpflb.v1.IntOrString":
        if isinstance(value, bool):
            raise ManifestError(f"{path}: Invalid value: {value!r}: must be a number or a name")
        if isinstance(value, int):
            return {"intVal": value}
        if isinstance(value, str):
            return {"strVal": value}
    if desc.full_name == "google.protobuf.Timestamp" or not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, v in value.items():
        sub = f"{path}.{key}" if path else str(key)
        f = _field_named(desc, str(key))
        if f is None:
            unknown.append(sub)
            continue
        if v is None:
            continue
        if f.message_type is not None and not _is_map(f):
            if f.is_repeated:
                if not isinstance(v, list):
                    raise ManifestError(f"{sub}: Invalid value: must be a list")
                v = [_clean(x, f.message_type, f"{sub}[{i}]", unknown) for i, x in enumerate(v)]
            else:
                v = _clean(v, f.message_type, sub, unknown)
        out[key] = v
    return out


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
