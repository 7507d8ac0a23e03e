"""Defaulting and validation of API objects, as the Kubernetes API server does them.

`apply_defaults` fills what a manifest may leave out (Kubernetes' SetDefaults_*),
then `validate` returns every problem as a FieldError that prints like
Kubernetes' field.Error (`spec.ports[0].port: Invalid value: 0: must be ...`).
The rules follow pkg/apis/core/validation and pkg/apis/discovery/validation,
narrowed to what ebpflb implements (IPv4, TCP/UDP, ClusterIP/NodePort).
Range checks that need cluster state (is the clusterIP in the service CIDR, is
the nodePort free) belong to the allocators, not here.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.labels import (
    dns1123_subdomain_errors,
    go_quote,
    is_label_key,
    is_label_value,
    label_key_errors,
    label_value_errors,
    max_len_error,
    regex_error,
)
from ebpflb.objects import KINDS, Kind, int_or_string, kind_of

__all__ = [
    "ErrorType",
    "FieldError",
    "apply_defaults",
    "validate",
    "is_dns1035_label",
    "is_dns1123_label",
    "is_dns1123_subdomain",
    "is_iana_svc_name",
    "is_ipv4",
    "is_ipv4_cidr",
    "dns1035_label_errors",
    "dns1123_label_errors",
    "dns1123_subdomain_errors",
    "iana_svc_name_errors",
    "ipv4_cidr_errors",
    "ipv4_errors",
    "port_num_errors",
]

# ------------------------------------------------------------------ errors


class ErrorType(StrEnum):
    """What is wrong with a field; the values are Kubernetes' StatusCause reasons."""

    REQUIRED = "FieldValueRequired"
    INVALID = "FieldValueInvalid"
    NOT_SUPPORTED = "FieldValueNotSupported"
    DUPLICATE = "FieldValueDuplicate"
    FORBIDDEN = "FieldValueForbidden"
    TOO_LONG = "FieldValueTooLong"
    TOO_MANY = "FieldValueTooMany"

    @property
    def text(self) -> str:
        """How Kubernetes prints the type ("Invalid value")."""
        return _ERROR_TEXT[self]


_ERROR_TEXT = {
    ErrorType.REQUIRED: "Required value",
    ErrorType.INVALID: "Invalid value",
    ErrorType.NOT_SUPPORTED: "Unsupported value",
    ErrorType.DUPLICATE: "Duplicate value",
    ErrorType.FORBIDDEN: "Forbidden",
    ErrorType.TOO_LONG: "Too long",
    ErrorType.TOO_MANY: "Too many",
}
# As in field.Error.ErrorBody: these types never show the value.
_VALUE_HIDDEN = frozenset({ErrorType.REQUIRED, ErrorType.FORBIDDEN, ErrorType.TOO_LONG})


@dataclass(frozen=True)
class FieldError:
    """One problem with one field. str() is Kubernetes' `path: Type: value: detail`."""

    path: str  # spec.ports[0].port
    kind: str  # an ErrorType
    value: object  # the offending value; strings print quoted, numbers bare
    detail: str = ""

    def __post_init__(self) -> None:
        ErrorType(self.kind)  # ValueError for a kind that is not one

    def __str__(self) -> str:
        kind = ErrorType(self.kind)
        body = kind.text if kind in _VALUE_HIDDEN else f"{kind.text}: {_show(self.value)}"
        if self.detail:
            body += f": {self.detail}"
        return f"{self.path}: {body}"

    @classmethod
    def required(cls, path: str, detail: str = "") -> FieldError:
        return cls(path, ErrorType.REQUIRED, "", detail)

    @classmethod
    def invalid(cls, path: str, value: object, detail: str) -> FieldError:
        return cls(path, ErrorType.INVALID, value, detail)

    @classmethod
    def not_supported(
        cls, path: str, value: object, supported: Iterable[str], why: str = ""
    ) -> FieldError:
        """`Unsupported value: "X": supported values: "A", "B"`, then `(why)` if given."""
        detail = "supported values: " + ", ".join(go_quote(s) for s in sorted(supported))
        if why:
            detail += f" ({why})"
        return cls(path, ErrorType.NOT_SUPPORTED, value, detail)

    @classmethod
    def duplicate(cls, path: str, value: object) -> FieldError:
        return cls(path, ErrorType.DUPLICATE, value)

    @classmethod
    def forbidden(cls, path: str, detail: str) -> FieldError:
        return cls(path, ErrorType.FORBIDDEN, "", detail)

    @classmethod
    def too_long(cls, path: str, max_bytes: int) -> FieldError:
        return cls(path, ErrorType.TOO_LONG, "", f"must have at most {max_bytes} bytes")

    @classmethod
    def too_many(cls, path: str, actual: int, maximum: int) -> FieldError:
        return cls(path, ErrorType.TOO_MANY, actual, f"must have at most {maximum} items")


def _show(value: object) -> str:
    """A value as Go's field.Error prints it: %q for strings, %v for numbers and bools."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return go_quote(value)
    return str(value)


@dataclass(frozen=True)
class _PortKey:
    """A (port, protocol) pair as a Duplicate value; prints `53/UDP`."""

    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


# ------------------------------------------------------------------ formats
#
# Each `*_errors` returns Kubernetes' explanations ([] when valid); the `is_*`
# predicates are for callers that only need yes or no.

_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL_RE = re.compile(_DNS1123_LABEL_FMT)
_DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_DNS1035_LABEL_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"
_DNS1035_LABEL_RE = re.compile(_DNS1035_LABEL_FMT)
_DNS1035_LABEL_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
    "start with an alphabetic character, and end with an alphanumeric character"
)
DNS_LABEL_MAX_LENGTH = 63
IANA_SVC_NAME_MAX_LENGTH = 15
_IANA_CHARSET_RE = re.compile("[-a-z0-9]+")
_PREFIX_LEN_RE = re.compile(r"0|[1-9][0-9]?")


def dns1123_label_errors(value: str) -> list[str]:
    """Why value is not a DNS-1123 label (`my-name`, `123-abc`): namespaces, port names."""
    errs = []
    if len(value) > DNS_LABEL_MAX_LENGTH:
        errs.append(max_len_error(DNS_LABEL_MAX_LENGTH))
    if not _DNS1123_LABEL_RE.fullmatch(value):
        if not dns1123_subdomain_errors(value):
            errs.append("must not contain dots")
        else:
            errs.append(regex_error(_DNS1123_LABEL_MSG, _DNS1123_LABEL_FMT, "my-name", "123-abc"))
    return errs


def dns1035_label_errors(value: str) -> list[str]:
    """Why value is not a DNS-1035 label (starts with a letter): Service names."""
    errs = []
    if len(value) > DNS_LABEL_MAX_LENGTH:
        errs.append(max_len_error(DNS_LABEL_MAX_LENGTH))
    if not _DNS1035_LABEL_RE.fullmatch(value):
        errs.append(regex_error(_DNS1035_LABEL_MSG, _DNS1035_LABEL_FMT, "my-name", "abc-123"))
    return errs


def iana_svc_name_errors(value: str) -> list[str]:
    """Why value is not an IANA service name (RFC 6335): named container and target ports."""
    errs = []
    if len(value) > IANA_SVC_NAME_MAX_LENGTH:
        errs.append(max_len_error(IANA_SVC_NAME_MAX_LENGTH))
    if not _IANA_CHARSET_RE.fullmatch(value):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search("[a-z]", value):
        errs.append("must contain at least one letter (a-z)")
    if "--" in value:
        errs.append("must not contain consecutive hyphens")
    if value.startswith("-") or value.endswith("-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def port_num_errors(port: int) -> list[str]:
    return [] if 1 <= port <= 65535 else ["must be between 1 and 65535"]


def ipv4_errors(value: str) -> list[str]:
    return [] if is_ipv4(value) else ["must be a valid IPv4 address"]


def ipv4_cidr_errors(value: str) -> list[str]:
    """Why value is not an IPv4 network `a.b.c.d/n` (host bits zero, unlike Kubernetes)."""
    ip, slash, length = value.partition("/")
    if not slash or not is_ipv4(ip) or not _PREFIX_LEN_RE.fullmatch(length) or int(length) > 32:
        return ["must be a valid IPv4 CIDR (e.g. 10.244.1.0/24)"]
    host_bits = (1 << (32 - int(length))) - 1
    if _ipv4_int(ip) & host_bits:
        return ["must have no host bits set (e.g. 10.244.1.0/24)"]
    return []


def is_dns1123_label(value: str) -> bool:
    return not dns1123_label_errors(value)


def is_dns1035_label(value: str) -> bool:
    return not dns1035_label_errors(value)


def is_dns1123_subdomain(value: str) -> bool:
    return not dns1123_subdomain_errors(value)


def is_iana_svc_name(value: str) -> bool:
    return not iana_svc_name_errors(value)


def is_ipv4(value: str) -> bool:
    """A dotted quad, each part 0-255 without leading zeros (`10.96.0.1`): what glibc's
    inet_pton takes (and in a tenth of the time of a pattern and four int() calls)."""
    try:
        socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


def is_ipv4_cidr(value: str) -> bool:
    return not ipv4_cidr_errors(value)


def _ipv4_int(ip: str) -> int:
    a, b, c, d = (int(p) for p in ip.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


# ------------------------------------------------------------------ defaults

TCP, UDP, SCTP = "TCP", "UDP", "SCTP"
PROTOCOLS = (TCP, UDP)
CLUSTER_IP, NODE_PORT = "ClusterIP", "NodePort"
SERVICE_TYPES = (CLUSTER_IP, NODE_PORT)
HEADLESS = "None"  # spec.clusterIP of a Service without a virtual IP
AFFINITY_NONE, AFFINITY_CLIENT_IP = "None", "ClientIP"
POLICY_CLUSTER, POLICY_LOCAL = "Cluster", "Local"
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, 3 hours
MAX_AFFINITY_TIMEOUT = 86400
IPV4 = "IPv4"
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP", "Hostname")
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
CONDITION_STATUSES = ("True", "False", "Unknown")
MAX_ENDPOINTS = 1000  # per EndpointSlice
MAX_ADDRESSES = 100  # per endpoint
TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024


def apply_defaults(obj: pb.Object) -> None:
    """Fill the fields a user may leave out, in place, as the API server's defaulting does.

    Run it on every write before `validate`. apiVersion, kind and the namespace
    ("default"; cleared for Nodes, which have none) are filled on every kind.
    """
    kind = kind_of(obj)
    which = obj.WhichOneof("kind")
    if which == "service":
        _default_meta(obj.service, kind)
        _default_service(obj.service.spec)
    elif which == "pod":
        _default_meta(obj.pod, kind)
        for c in obj.pod.spec.containers:
            for cp in c.ports:
                cp.protocol = cp.protocol or TCP
    elif which == "node":
        _default_meta(obj.node, kind)
    elif which == "endpoint_slice":
        eps = obj.endpoint_slice
        _default_meta(eps, kind)
        eps.address_type = eps.address_type or IPV4
        for ep in eps.ports:
            ep.protocol = ep.protocol or TCP


def _default_meta(msg: pb.Service | pb.Pod | pb.Node | pb.EndpointSlice, kind: Kind) -> None:
    msg.api_version = msg.api_version or kind.api_version
    msg.kind = msg.kind or kind.name
    if kind.namespaced:
        msg.metadata.namespace = msg.metadata.namespace or "default"
    else:
        msg.metadata.namespace = ""


def _default_service(spec: pb.ServiceSpec) -> None:
    spec.type = spec.type or CLUSTER_IP
    if not spec.cluster_ip and spec.cluster_ips:
        spec.cluster_ip = spec.cluster_ips[0]
    for p in spec.ports:
        p.protocol = p.protocol or TCP
        if int_or_string(p.target_port) in (None, 0, ""):
            p.target_port.int_val = p.port
    spec.session_affinity = spec.session_affinity or AFFINITY_NONE
    if spec.session_affinity == AFFINITY_CLIENT_IP:
        client_ip = spec.session_affinity_config.client_ip
        if not client_ip.HasField("timeout_seconds"):
            client_ip.timeout_seconds = DEFAULT_AFFINITY_TIMEOUT
    if spec.type == NODE_PORT:  # externally accessible
        spec.external_traffic_policy = spec.external_traffic_policy or POLICY_CLUSTER
    if spec.type in SERVICE_TYPES:
        spec.internal_traffic_policy = spec.internal_traffic_policy or POLICY_CLUSTER


# ------------------------------------------------------------------ validation

Errors = Iterator[FieldError]


def validate(obj: pb.Object, old: pb.Object | None = None) -> list[FieldError]:
    """Every problem with obj (after apply_defaults); [] when it may be stored.

    With `old` (the stored object of the same key), the update rules too: a
    Service's clusterIP may not change once set. Leaving clusterIP "" on an
    update is fine here; carrying the old value over is the caller's merge.
    """
    which = obj.WhichOneof("kind")
    if old is not None and old.WhichOneof("kind") != which:
        raise ValueError(f"cannot validate a {which} as an update of a {old.WhichOneof('kind')}")
    if which == "service":
        errs = [] if _plain_service(obj.service) else list(_service(obj.service))
        if old is not None:
            errs += _service_update(obj.service, old.service)
        return errs
    if which == "pod":
        return list(_pod(obj.pod))
    if which == "node":
        return list(_node(obj.node))
    if which == "endpoint_slice":
        return list(_endpoint_slice(obj.endpoint_slice))
    return [FieldError.required("kind")]


def _type_meta(msg: pb.Service | pb.Pod | pb.Node | pb.EndpointSlice, kind: Kind) -> Errors:
    if msg.api_version and msg.api_version != kind.api_version:
        yield FieldError.invalid("apiVersion", msg.api_version, f"must be {kind.api_version}")
    if msg.kind and msg.kind != kind.name:
        yield FieldError.invalid("kind", msg.kind, f"must be {kind.name}")


def _metadata(
    msg: pb.Service | pb.Pod | pb.Node | pb.EndpointSlice,
    kind: Kind,
    name_errors: Callable[[str], list[str]],
) -> Errors:
    yield from _type_meta(msg, kind)
    meta = msg.metadata
    if not meta.name:
        yield FieldError.required("metadata.name")
    else:
        for m in name_errors(meta.name):
            yield FieldError.invalid("metadata.name", meta.name, m)
    if not kind.namespaced:
        if meta.namespace:
            yield FieldError.forbidden("metadata.namespace", "not allowed on this type")
    elif not meta.namespace:
        yield FieldError.required("metadata.namespace")
    else:
        for m in dns1123_label_errors(meta.namespace):
            yield FieldError.invalid("metadata.namespace", meta.namespace, m)
    if meta.generation < 0:
        yield FieldError.invalid(
            "metadata.generation", meta.generation, "must be greater than or equal to 0"
        )
    yield from _labels(meta.labels, "metadata.labels")
    yield from _annotations(meta.annotations, "metadata.annotations")


def _labels(labels: Mapping[str, str], path: str) -> Errors:
    """Keys and values of a label map (labels, a Service's selector), in key order."""
    for k in sorted(labels):
        for m in label_key_errors(k):
            yield FieldError.invalid(path, k, m)
        for m in label_value_errors(labels[k]):
            yield FieldError.invalid(path, labels[k], m)


def _annotations(annotations: Mapping[str, str], path: str) -> Errors:
    """Keys are label keys in any case; values are free, within a total size."""
    for k in sorted(annotations):
        for m in label_key_errors(k.lower()):
            yield FieldError.invalid(path, k, m)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > TOTAL_ANNOTATION_SIZE_LIMIT:
        yield FieldError.too_long(path, TOTAL_ANNOTATION_SIZE_LIMIT)


def _port_num(path: str, port: int) -> Errors:
    for m in port_num_errors(port):
        yield FieldError.invalid(path, port, m)


def _protocol(path: str, protocol: str) -> Errors:
    if not protocol:
        yield FieldError.required(path)
    elif protocol == SCTP:
        yield FieldError.not_supported(
            path, protocol, PROTOCOLS, "ebpflb does not support SCTP yet"
        )
    elif protocol not in PROTOCOLS:
        yield FieldError.not_supported(path, protocol, PROTOCOLS)


def _ipv4(path: str, value: str) -> Errors:
    for m in ipv4_errors(value):
        yield FieldError.invalid(path, value, m)


# ---------------------------------------------------------------- Service


def _service(svc: pb.Service) -> Errors:
    yield from _metadata(svc, KINDS["Service"], dns1035_label_errors)
    spec = svc.spec
    headless = spec.cluster_ip == HEADLESS
    if not spec.ports and not headless:
        yield FieldError.required("spec.ports")
    names: set[str] = set()
    for i, port in enumerate(spec.ports):
        yield from _service_port(port, f"spec.ports[{i}]", len(spec.ports) > 1, names)
    yield from _labels(spec.selector, "spec.selector")
    yield from _session_affinity(spec)
    yield from _cluster_ips(spec)
    yield from _service_type(spec.type)
    yield from _node_ports(spec)
    seen: set[_PortKey] = set()
    for i, port in enumerate(spec.ports):
        key = _PortKey(port.port, port.protocol)
        if key in seen:
            yield FieldError.duplicate(f"spec.ports[{i}]", key)
        seen.add(key)
    yield from _traffic_policies(spec)
    yield from _ip_families(spec)


def _plain_service(svc: pb.Service) -> bool:
    """True when svc has the usual shape (a ClusterIP Service of TCP/UDP ports, no
    annotations, affinity, node ports or dual-stack fields) and passes _service()'s
    rules for it: checked in a fraction of _service()'s time, which was most of a bulk
    Apply. False sends svc the long way, which words every error; it never decides
    that something is wrong."""
    meta, spec = svc.metadata, svc.spec
    if (
        svc.api_version not in ("", "v1")
        or svc.kind not in ("", "Service")
        or meta.generation < 0
        or meta.annotations
        or not is_dns1035_label(meta.name)
        or not is_dns1123_label(meta.namespace)
        or not _plain_labels(meta.labels)
        or not _plain_labels(spec.selector)
        or spec.type != CLUSTER_IP
        or spec.session_affinity != AFFINITY_NONE
        or spec.HasField("session_affinity_config")
        or spec.external_traffic_policy
        or spec.health_check_node_port
        or spec.internal_traffic_policy not in (POLICY_CLUSTER, POLICY_LOCAL)
        or spec.ip_family_policy not in ("", "SingleStack", "PreferDualStack")
        or len(spec.ip_families) > 1
        or (spec.ip_families and spec.ip_families[0] != IPV4)
    ):
        return False
    ip, ips = spec.cluster_ip, spec.cluster_ips
    ip_ok = ip == "" or is_ipv4(ip)
    if not ip_ok or not (len(ips) == 0 or (len(ips) == 1 and ip != "" and ips[0] == ip)):
        return False
    ports = spec.ports
    if not ports:
        return False
    names: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for port in ports:
        target = int_or_string(port.target_port)
        if (
            port.node_port
            or port.app_protocol
            or not 1 <= port.port <= 65535
            or port.protocol not in PROTOCOLS
            or (port.port, port.protocol) in seen
            or not (
                (isinstance(target, int) and 1 <= target <= 65535)
                or (isinstance(target, str) and target != "" and is_iana_svc_name(target))
            )
        ):
            return False
        seen.add((port.port, port.protocol))
        if port.name or len(ports) > 1:
            if port.name in names or not is_dns1123_label(port.name):
                return False
            names.add(port.name)
    return True


def _plain_labels(labels: Mapping[str, str]) -> bool:
    return not labels or all(is_label_key(k) and is_label_value(labels[k]) for k in labels)


def _service_type(type_: str) -> Errors:
    if not type_:
        yield FieldError.required("spec.type")
    elif type_ in ("LoadBalancer", "ExternalName"):
        why = f"{type_} Services are not supported by ebpflb"
        yield FieldError.not_supported("spec.type", type_, SERVICE_TYPES, why)
    elif type_ not in SERVICE_TYPES:
        yield FieldError.not_supported("spec.type", type_, SERVICE_TYPES)


def _service_port(port: pb.ServicePort, path: str, name_required: bool, names: set[str]) -> Errors:
    if not port.name:
        if name_required:
            yield FieldError.required(f"{path}.name")
    else:
        for m in dns1123_label_errors(port.name):
            yield FieldError.invalid(f"{path}.name", port.name, m)
        if port.name in names:
            yield FieldError.duplicate(f"{path}.name", port.name)
        names.add(port.name)
    yield from _port_num(f"{path}.port", port.port)
    yield from _protocol(f"{path}.protocol", port.protocol)
    yield from _target_port(f"{path}.targetPort", int_or_string(port.target_port))
    if port.app_protocol:
        for m in label_key_errors(port.app_protocol):
            yield FieldError.invalid(f"{path}.appProtocol", port.app_protocol, m)


def _target_port(path: str, target: int | str | None) -> Errors:
    """A port number, or the name of a container port in the selected pods."""
    if target is None or target == "":
        yield FieldError.required(path)
    elif isinstance(target, int):
        yield from _port_num(path, target)
    else:
        for m in iana_svc_name_errors(target):
            yield FieldError.invalid(path, target, m)


def _node_ports(spec: pb.ServiceSpec) -> Errors:
    """Zero (allocate) or a port for NodePort Services, nothing for the others.

    Whether a port is within the node port range and free is the allocator's
    question. One nodePort may serve two ports only with different protocols.
    """
    seen: set[_PortKey] = set()
    for i, port in enumerate(spec.ports):
        path = f"spec.ports[{i}].nodePort"
        if port.node_port == 0:
            continue
        if spec.type == CLUSTER_IP:
            yield FieldError.forbidden(path, "may not be used when type is 'ClusterIP'")
        elif spec.type == NODE_PORT:
            yield from _port_num(path, port.node_port)
            key = _PortKey(port.node_port, port.protocol)
            if key in seen:
                yield FieldError.duplicate(path, port.node_port)
            seen.add(key)


def _cluster_ips(spec: pb.ServiceSpec) -> Errors:
    """ "" (allocate), "None" (headless) or an IPv4 address; clusterIPs agrees with it."""
    ip = spec.cluster_ip
    if ip == HEADLESS:
        if spec.type == NODE_PORT:
            yield FieldError.invalid(
                "spec.clusterIP", ip, "may not be set to 'None' for NodePort services"
            )
    elif ip:
        yield from _ipv4("spec.clusterIP", ip)
    if len(spec.cluster_ips) > 1:
        yield FieldError.too_many("spec.clusterIPs", len(spec.cluster_ips), 1)
    for i, value in enumerate(spec.cluster_ips):
        path = f"spec.clusterIPs[{i}]"
        if i == 0 and ip and value != ip:
            yield FieldError.invalid(path, value, "must match spec.clusterIP")
        elif value != HEADLESS:
            yield from _ipv4(path, value)


def _session_affinity(spec: pb.ServiceSpec) -> Errors:
    path = "spec.sessionAffinityConfig"
    affinity = spec.session_affinity
    if not affinity:
        yield FieldError.required("spec.sessionAffinity")
    elif affinity not in (AFFINITY_NONE, AFFINITY_CLIENT_IP):
        supported = (AFFINITY_NONE, AFFINITY_CLIENT_IP)
        yield FieldError.not_supported("spec.sessionAffinity", affinity, supported)
    elif affinity == AFFINITY_NONE:
        if spec.HasField("session_affinity_config"):
            yield FieldError.forbidden(path, "must not be set when session affinity is None")
    else:
        why = "when session affinity type is ClientIP"
        config = spec.session_affinity_config
        if not spec.HasField("session_affinity_config"):
            yield FieldError.required(path, why)
        elif not config.HasField("client_ip"):
            yield FieldError.required(f"{path}.clientIP", why)
        elif not config.client_ip.HasField("timeout_seconds"):
            yield FieldError.required(f"{path}.clientIP.timeoutSeconds", why)
        elif not 1 <= config.client_ip.timeout_seconds <= MAX_AFFINITY_TIMEOUT:
            yield FieldError.invalid(
                f"{path}.clientIP.timeoutSeconds",
                config.client_ip.timeout_seconds,
                f"must be between 1 and {MAX_AFFINITY_TIMEOUT}",
            )


def _traffic_policies(spec: pb.ServiceSpec) -> Errors:
    policies = (POLICY_CLUSTER, POLICY_LOCAL)
    etp = spec.external_traffic_policy
    if spec.type != NODE_PORT:  # not externally accessible
        if etp:
            path, detail = (
                "spec.externalTrafficPolicy",
                "may only be set for externally-accessible services",
            )
            yield FieldError.invalid(path, etp, detail)
    elif not etp:
        yield FieldError.required("spec.externalTrafficPolicy")
    elif etp not in policies:
        yield FieldError.not_supported("spec.externalTrafficPolicy", etp, policies)
    itp = spec.internal_traffic_policy
    if not itp:
        if spec.type in SERVICE_TYPES:
            yield FieldError.required(
                "spec.internalTrafficPolicy", f"must be specified when type is '{spec.type}'"
            )
    elif itp not in policies:
        yield FieldError.not_supported("spec.internalTrafficPolicy", itp, policies)
    # kube-proxy answers health checks for NodePort Services with
    # externalTrafficPolicy=Local (Kubernetes has them on LoadBalancer ones, which
    # ebpflb has not): the port comes from the node-port range.
    if spec.health_check_node_port:
        path = "spec.healthCheckNodePort"
        if spec.type != NODE_PORT or etp != POLICY_LOCAL:
            yield FieldError.invalid(
                path,
                spec.health_check_node_port,
                "may only be set when type is 'NodePort' and externalTrafficPolicy is 'Local'",
            )
        else:
            yield from _port_num(path, spec.health_check_node_port)


def _ip_families(spec: pb.ServiceSpec) -> Errors:
    """ebpflb is IPv4 single-stack: ipFamilies [IPv4], no dual-stack requirement."""
    for i, family in enumerate(spec.ip_families):
        path = f"spec.ipFamilies[{i}]"
        if family != IPV4:
            yield FieldError.not_supported(path, family, (IPV4,), "ebpflb is IPv4-only")
        elif i > 0:
            yield FieldError.duplicate(path, family)
    policy = spec.ip_family_policy
    if policy == "RequireDualStack":
        yield FieldError.invalid(
            "spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services"
        )
    elif policy and policy not in ("SingleStack", "PreferDualStack"):
        supported = ("SingleStack", "PreferDualStack", "RequireDualStack")
        yield FieldError.not_supported("spec.ipFamilyPolicy", policy, supported)


def _service_update(new: pb.Service, old: pb.Service) -> Errors:
    before, after = old.spec.cluster_ip, new.spec.cluster_ip
    if before and after and before != after:
        yield FieldError.invalid("spec.clusterIP", after, "field is immutable")


# ---------------------------------------------------------------- Pod


def _pod(pod: pb.Pod) -> Errors:
    yield from _metadata(pod, KINDS["Pod"], dns1123_subdomain_errors)
    spec = pod.spec
    if not spec.containers:
        yield FieldError.required("spec.containers")
    names: set[str] = set()
    port_names: set[str] = set()  # unique in the whole pod: a targetPort names one
    for i, c in enumerate(spec.containers):
        path = f"spec.containers[{i}]"
        if not c.name:
            yield FieldError.required(f"{path}.name")
        else:
            for m in dns1123_label_errors(c.name):
                yield FieldError.invalid(f"{path}.name", c.name, m)
            if c.name in names:
                yield FieldError.duplicate(f"{path}.name", c.name)
            names.add(c.name)
        for j, port in enumerate(c.ports):
            yield from _container_port(port, f"{path}.ports[{j}]", port_names)
    if spec.node_name:
        for m in dns1123_subdomain_errors(spec.node_name):
            yield FieldError.invalid("spec.nodeName", spec.node_name, m)
    for field_, value in (("hostname", spec.hostname), ("subdomain", spec.subdomain)):
        for m in dns1123_label_errors(value) if value else ():
            yield FieldError.invalid(f"spec.{field_}", value, m)
    if (
        spec.HasField("termination_grace_period_seconds")
        and spec.termination_grace_period_seconds < 0
    ):
        yield FieldError.invalid(
            "spec.terminationGracePeriodSeconds",
            spec.termination_grace_period_seconds,
            "must be greater than or equal to 0",
        )
    yield from _pod_status(pod.status)


def _container_port(port: pb.ContainerPort, path: str, names: set[str]) -> Errors:
    if port.name:
        if errs := iana_svc_name_errors(port.name):
            for m in errs:
                yield FieldError.invalid(f"{path}.name", port.name, m)
        elif port.name in names:
            yield FieldError.duplicate(f"{path}.name", port.name)
        names.add(port.name)
    if port.container_port == 0:
        yield FieldError.required(f"{path}.containerPort")
    else:
        yield from _port_num(f"{path}.containerPort", port.container_port)
    if port.host_port:
        yield from _port_num(f"{path}.hostPort", port.host_port)
    yield from _protocol(f"{path}.protocol", port.protocol)


def _pod_status(status: pb.PodStatus) -> Errors:
    if status.phase and status.phase not in POD_PHASES:
        yield FieldError.not_supported("status.phase", status.phase, POD_PHASES)
    if status.pod_ip:
        yield from _ipv4("status.podIP", status.pod_ip)
    for i, pod_ip in enumerate(status.pod_ips):
        path = f"status.podIPs[{i}].ip"
        if i == 0 and status.pod_ip and pod_ip.ip != status.pod_ip:
            yield FieldError.invalid(path, pod_ip.ip, "must match status.podIP")
        else:
            yield from _ipv4(path, pod_ip.ip)
    if status.host_ip:
        yield from _ipv4("status.hostIP", status.host_ip)
    for i, cond in enumerate(status.conditions):
        path = f"status.conditions[{i}]"
        if not cond.type:
            yield FieldError.required(f"{path}.type")
        if cond.status not in CONDITION_STATUSES:
            yield FieldError.not_supported(f"{path}.status", cond.status, CONDITION_STATUSES)


# ---------------------------------------------------------------- Node


def _node(node: pb.Node) -> Errors:
    yield from _metadata(node, KINDS["Node"], dns1123_subdomain_errors)
    spec = node.spec
    if spec.pod_cidr:
        for m in ipv4_cidr_errors(spec.pod_cidr):
            yield FieldError.invalid("spec.podCIDR", spec.pod_cidr, m)
    for i, cidr in enumerate(spec.pod_cidrs):
        path = f"spec.podCIDRs[{i}]"
        if i == 0 and spec.pod_cidr and cidr != spec.pod_cidr:
            yield FieldError.invalid(path, cidr, "must match spec.podCIDR")
            continue
        for m in ipv4_cidr_errors(cidr):
            yield FieldError.invalid(path, cidr, m)
    for i, addr in enumerate(node.status.addresses):
        path = f"status.addresses[{i}]"
        if not addr.type:
            yield FieldError.required(f"{path}.type")
        elif addr.type not in NODE_ADDRESS_TYPES:
            yield FieldError.not_supported(f"{path}.type", addr.type, NODE_ADDRESS_TYPES)
        if not addr.address:
            yield FieldError.required(f"{path}.address")
        elif addr.type == "Hostname":
            for m in dns1123_subdomain_errors(addr.address):
                yield FieldError.invalid(f"{path}.address", addr.address, m)
        elif addr.type in ("InternalIP", "ExternalIP"):
            yield from _ipv4(f"{path}.address", addr.address)


# ---------------------------------------------------------------- EndpointSlice


def _endpoint_slice(eps: pb.EndpointSlice) -> Errors:
    """Paths start at the top: an EndpointSlice has no spec."""
    yield from _metadata(eps, KINDS["EndpointSlice"], dns1123_subdomain_errors)
    if not eps.address_type:
        yield FieldError.required("addressType")
    elif eps.address_type != IPV4:
        why = "ebpflb is IPv4-only"
        yield FieldError.not_supported("addressType", eps.address_type, (IPV4,), why)
    if len(eps.endpoints) > MAX_ENDPOINTS:
        yield FieldError.too_many("endpoints", len(eps.endpoints), MAX_ENDPOINTS)
    for i, ep in enumerate(eps.endpoints):
        path = f"endpoints[{i}]"
        if not ep.addresses:
            yield FieldError.required(f"{path}.addresses", "must contain at least 1 address")
        elif len(ep.addresses) > MAX_ADDRESSES:
            yield FieldError.too_many(f"{path}.addresses", len(ep.addresses), MAX_ADDRESSES)
        for j, address in enumerate(ep.addresses):
            if eps.address_type == IPV4:
                yield from _ipv4(f"{path}.addresses[{j}]", address)
        if ep.node_name:
            for m in dns1123_subdomain_errors(ep.node_name):
                yield FieldError.invalid(f"{path}.nodeName", ep.node_name, m)
    names: set[str] = set()
    for i, port in enumerate(eps.ports):
        path = f"ports[{i}]"
        for m in dns1123_label_errors(port.name) if port.name else ():
            yield FieldError.invalid(f"{path}.name", port.name, m)
        if port.name in names:
            yield FieldError.duplicate(f"{path}.name", port.name)
        names.add(port.name)
        yield from _protocol(f"{path}.protocol", port.protocol)
        if port.HasField("port"):
            yield from _port_num(f"{path}.port", port.port)
