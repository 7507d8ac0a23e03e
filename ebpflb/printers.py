"""What `ebpflb get` and `describe` print: objects as kubectl's tables, descriptions, YAML, JSON.

Pure functions of objects (and of `now`, for AGE), so they are tested without a registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import (
    DEFAULT_NAMESPACE,
    SERVICE_NAME_LABEL,
    Kind,
    int_or_string,
    kind_of,
    message_of,
    to_manifest,
)
from ebpflb.registry.endpoints import pod_is_ready

NONE = "<none>"
# kubectl shows at most this many endpoints in a cell, then " + N more...".
MAX_ENDPOINTS_SHOWN = 3

# ------------------------------------------------------------------ layout


def tabwrite(text: str, *, minwidth: int, padding: int) -> str:
    """Align tab-separated cells as Go's text/tabwriter does (kubectl's layout).

    A cell is text ended by a tab; the last cell of a line is not part of a
    column. A column block is a run of consecutive lines that have a cell in
    that column; its width is its widest cell plus padding (at least minwidth).
    """
    lines = [line.split("\t") for line in text.split("\n")]
    widths: list[int] = []
    out: list[str] = []

    def write_lines(first: int, end: int) -> None:
        for cells in lines[first:end]:
            parts: list[str] = []
            for j, cell in enumerate(cells):
                parts.append(cell)
                if j < len(widths):
                    parts.append(" " * (widths[j] - len(cell)))
            out.append("".join(parts))

    def format_block(first: int, end: int) -> None:
        column = len(widths)
        this = first
        while this < end:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(first, this)
            first = this
            width = minwidth
            while this < end and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + padding)
                this += 1
            widths.append(width)
            format_block(first, this)
            widths.pop()
            first = this
        write_lines(first, end)

    format_block(0, len(lines))
    return "\n".join(out)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """kubectl's table: left-aligned columns, 3 spaces apart, header in upper case."""
    text = "".join("\t".join(row) + "\n" for row in [[h.upper() for h in header], *rows])
    return tabwrite(text, minwidth=6, padding=3)


# ------------------------------------------------------------------ cells


def human_duration(seconds: float) -> str:
    """A duration as kubectl shows an AGE (k8s.io/apimachinery duration.HumanDuration)."""
    s = int(seconds)  # toward zero, as Go's int(d.Seconds())
    if s < -1:
        return "<invalid>"  # clocks more than a second apart
    if s < 0:
        return "0s"
    if s < 2 * 60:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return _two_units(minutes, "m", s % 60, "s")
    if minutes < 3 * 60:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return _two_units(hours, "h", minutes % 60, "m")
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return _two_units(days, "d", hours % 24, "h")
    if hours < 24 * 365 * 2:
        return f"{days}d"
    if hours < 24 * 365 * 8:
        return _two_units(days // 365, "y", days % 365, "d")
    return f"{days // 365}y"


def _two_units(big: int, big_unit: str, small: int, small_unit: str) -> str:
    return f"{big}{big_unit}" if small == 0 else f"{big}{big_unit}{small}{small_unit}"


def age(meta: pb.ObjectMeta, now: datetime) -> str:
    """The AGE cell: time since creation, `<unknown>` when the object has no creation time."""
    if not meta.HasField("creation_timestamp"):
        return "<unknown>"
    created = meta.creation_timestamp.ToDatetime(tzinfo=UTC)
    return human_duration((now - created).total_seconds())


def format_labels(labels: Mapping[str, str]) -> str:
    """`a=b,c=d` in key order, `<none>` when empty (labels.FormatLabels)."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or NONE


def service_ports(ports: Iterable[pb.ServicePort]) -> str:
    """`80/TCP`, or `80:30080/TCP` with a nodePort, joined by commas."""
    pieces = []
    for p in ports:
        proto = p.protocol or "TCP"
        pieces.append(f"{p.port}:{p.node_port}/{proto}" if p.node_port else f"{p.port}/{proto}")
    return ",".join(pieces)


def _more(shown: list[str], count: int) -> str:
    text = ",".join(shown)
    if count > len(shown):
        return f"{text} + {count - len(shown)} more..."
    return text


def _is_ready(ep: pb.Endpoint) -> bool:
    # An unset condition means "unknown", which consumers take as ready.
    return not ep.conditions.HasField("ready") or ep.conditions.ready


def ready_endpoints(slices: Iterable[pb.EndpointSlice], port_name: str | None = None) -> str:
    """Ready endpoints as `ip:port,...` (just `ip` for a slice without ports), at
    most three then ` + N more...`; port_name keeps only that port. "" when none."""
    shown: list[str] = []
    count = 0

    def add(item: str) -> None:
        nonlocal count
        if len(shown) < MAX_ENDPOINTS_SHOWN:
            shown.append(item)
        count += 1

    for sl in sorted(slices, key=lambda s: s.metadata.name):
        addresses = sorted(e.addresses[0] for e in sl.endpoints if e.addresses and _is_ready(e))
        if not sl.ports:
            for a in addresses:
                add(a)
            continue
        for port in sl.ports:
            if (port_name is not None and port.name != port_name) or not port.HasField("port"):
                continue
            for a in addresses:
                add(f"[{a}]:{port.port}" if ":" in a else f"{a}:{port.port}")
    return _more(shown, count)


def _slice_ports(ports: Iterable[pb.EndpointPort]) -> str:
    items = []
    for p in ports:
        items.append(str(p.port) if p.HasField("port") else (p.name or "*"))
    return _more(items[:MAX_ENDPOINTS_SHOWN], len(items)) or "<unset>"


def _slice_addresses(endpoints: Iterable[pb.Endpoint]) -> str:
    items = [a for e in endpoints for a in e.addresses]
    return _more(items[:MAX_ENDPOINTS_SHOWN], len(items)) or "<unset>"


# ------------------------------------------------------------------ get tables


@dataclass(frozen=True)
class _Columns:
    header: tuple[str, ...]
    wide: tuple[str, ...]  # added by -o wide
    row: Callable[[Any, datetime, bool], list[str]]


def _service_row(svc: pb.Service, now: datetime, wide: bool) -> list[str]:
    spec = svc.spec
    ip = spec.cluster_ips[0] if spec.cluster_ips else (spec.cluster_ip or NONE)
    row = [
        svc.metadata.name,
        spec.type or "ClusterIP",
        ip,
        NONE,  # EXTERNAL-IP: no LoadBalancer Services, no externalIPs
        service_ports(spec.ports) or NONE,
        age(svc.metadata, now),
    ]
    if wide:
        row.append(format_labels(spec.selector))
    return row


def _pod_row(pod: pb.Pod, now: datetime, wide: bool) -> list[str]:
    containers = len(pod.spec.containers)
    # The registry's own rule, so READY agrees with what the endpoints say.
    ready = containers if pod_is_ready(pod) else 0
    if pod.metadata.HasField("deletion_timestamp"):
        status = "Terminating"
    else:
        status = pod.status.phase or "Pending"
    row = [pod.metadata.name, f"{ready}/{containers}", status, "0", age(pod.metadata, now)]
    if wide:
        ip = pod.status.pod_ips[0].ip if pod.status.pod_ips else pod.status.pod_ip
        row += [ip or NONE, pod.spec.node_name or NONE]
    return row


def node_status(node: pb.Node) -> str:
    """kubectl's STATUS: Ready, NotReady, or Unknown without a Ready condition."""
    for c in node.status.conditions:
        if c.type == "Ready":
            return {"True": "Ready", "False": "NotReady"}.get(c.status, "Unknown")
    return "Unknown"


def _node_row(node: pb.Node, now: datetime, wide: bool) -> list[str]:
    internal = [a.address for a in node.status.addresses if a.type == "InternalIP"]
    cidrs = list(node.spec.pod_cidrs) or ([node.spec.pod_cidr] if node.spec.pod_cidr else [])
    return [
        node.metadata.name,
        node_status(node),
        internal[0] if internal else NONE,
        ",".join(cidrs) or NONE,
        age(node.metadata, now),
    ]


def _slice_row(sl: pb.EndpointSlice, now: datetime, wide: bool) -> list[str]:
    return [
        sl.metadata.name,
        sl.address_type,
        _slice_ports(sl.ports),
        _slice_addresses(sl.endpoints),
        age(sl.metadata, now),
    ]


_COLUMNS: dict[str, _Columns] = {
    "Service": _Columns(
        ("NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"), ("SELECTOR",), _service_row
    ),
    "Pod": _Columns(("NAME", "READY", "STATUS", "RESTARTS", "AGE"), ("IP", "NODE"), _pod_row),
    "Node": _Columns(("NAME", "STATUS", "INTERNAL-IP", "POD-CIDR", "AGE"), (), _node_row),
    "EndpointSlice": _Columns(("NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"), (), _slice_row),
}


def get_table(
    kind: Kind,
    objects: Sequence[pb.Object],
    now: datetime,
    *,
    wide: bool = False,
    with_namespace: bool = False,
) -> str:
    """`ebpflb get KIND` as a table of objects of that kind, in the order given."""
    cols = _COLUMNS[kind.name]
    header = list(cols.header) + (list(cols.wide) if wide else [])
    rows = []
    for obj in objects:
        msg = message_of(obj)
        row = cols.row(msg, now, wide)
        if with_namespace and kind.namespaced:
            row.insert(0, msg.metadata.namespace or DEFAULT_NAMESPACE)
        rows.append(row)
    if with_namespace and kind.namespaced:
        header.insert(0, "NAMESPACE")
    return table(header, rows)


@dataclass(frozen=True)
class ServiceEndpoints:
    """kubectl's Endpoints object of one Service, seen through its EndpointSlices."""

    namespace: str
    name: str
    slices: tuple[pb.EndpointSlice, ...]
    meta: pb.ObjectMeta  # for AGE: the Service's, or its oldest slice's when it has none


def service_endpoints(
    services: Iterable[pb.Service], slices: Iterable[pb.EndpointSlice], *, orphans: bool = True
) -> list[ServiceEndpoints]:
    """The Endpoints rows, in (namespace, name) order: every Service that has a
    selector or EndpointSlices, with its slices (found by their service-name label);
    with orphans, also slices whose Service is not among services."""
    by_service: dict[tuple[str, str], list[pb.EndpointSlice]] = {}
    for sl in slices:
        service = sl.metadata.labels.get(SERVICE_NAME_LABEL)
        if service:
            ns = sl.metadata.namespace or DEFAULT_NAMESPACE
            by_service.setdefault((ns, service), []).append(sl)
    rows: dict[tuple[str, str], ServiceEndpoints] = {}
    for svc in services:
        key = (svc.metadata.namespace or DEFAULT_NAMESPACE, svc.metadata.name)
        own = by_service.pop(key, [])
        if svc.spec.selector or own:
            rows[key] = ServiceEndpoints(*key, tuple(own), svc.metadata)
    if orphans:
        for key, own in by_service.items():
            oldest = min(own, key=lambda s: s.metadata.creation_timestamp.ToNanoseconds())
            rows[key] = ServiceEndpoints(*key, tuple(own), oldest.metadata)
    return [rows[k] for k in sorted(rows)]


def endpoints_table(
    endpoints: Sequence[ServiceEndpoints], now: datetime, *, with_namespace: bool = False
) -> str:
    """`ebpflb get endpoints`: NAME (the Service), its ready endpoints, AGE."""
    header = ["NAME", "ENDPOINTS", "AGE"]
    rows = []
    for ep in endpoints:
        row = [ep.name, ready_endpoints(ep.slices) or NONE, age(ep.meta, now)]
        if with_namespace:
            row.insert(0, ep.namespace)
        rows.append(row)
    if with_namespace:
        header.insert(0, "NAMESPACE")
    return table(header, rows)


# ------------------------------------------------------------------ describe


def _multiline(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return [f"{title}:\t{NONE}"]
    return [f"{title}:\t{items[0]}", *(f"\t{item}" for item in items[1:])]


def describe_service(svc: pb.Service, slices: Sequence[pb.EndpointSlice]) -> str:
    """`ebpflb describe service`: kubectl's layout; slices are the Service's EndpointSlices."""
    meta, spec = svc.metadata, svc.spec
    labels = [f"{k}={meta.labels[k]}" for k in sorted(meta.labels)]
    annotations = [f"{k}: {meta.annotations[k]}" for k in sorted(meta.annotations)]
    lines = [
        f"Name:\t{meta.name}",
        f"Namespace:\t{meta.namespace or DEFAULT_NAMESPACE}",
        *_multiline("Labels", labels),
        *_multiline("Annotations", annotations),
        f"Selector:\t{format_labels(spec.selector)}",
        f"Type:\t{spec.type or 'ClusterIP'}",
    ]
    if spec.ip_family_policy:
        lines.append(f"IP Family Policy:\t{spec.ip_family_policy}")
    if spec.ip_families:
        lines.append(f"IP Families:\t{','.join(spec.ip_families)}")
    lines.append(f"IP:\t{spec.cluster_ip or NONE}")
    if spec.cluster_ips:
        lines.append(f"IPs:\t{','.join(spec.cluster_ips)}")
    for p in spec.ports:
        name = p.name or "<unset>"
        proto = p.protocol or "TCP"
        target = int_or_string(p.target_port)
        lines.append(f"Port:\t{name}\t{p.port}/{proto}")
        lines.append(f"TargetPort:\t{p.port if target is None else target}/{proto}")
        if p.node_port:
            lines.append(f"NodePort:\t{name}\t{p.node_port}/{proto}")
        endpoints = ready_endpoints(slices, port_name=p.name) if slices else ""
        lines.append(f"Endpoints:\t{endpoints or NONE}")
    lines.append(f"Session Affinity:\t{spec.session_affinity or 'None'}")
    if spec.session_affinity == "ClientIP" and spec.session_affinity_config.client_ip.HasField(
        "timeout_seconds"
    ):
        timeout = spec.session_affinity_config.client_ip.timeout_seconds
        lines.append(f"Session Affinity Timeout:\t{timeout}s")
    if spec.external_traffic_policy or spec.type == "NodePort":
        lines.append(f"External Traffic Policy:\t{spec.external_traffic_policy or 'Cluster'}")
    lines.append(f"Internal Traffic Policy:\t{spec.internal_traffic_policy or 'Cluster'}")
    if spec.health_check_node_port:
        lines.append(f"HealthCheck NodePort:\t{spec.health_check_node_port}")
    return tabwrite("\n".join(lines) + "\n", minwidth=0, padding=2)


# ------------------------------------------------------------------ names, YAML, JSON


def resource_type(kind: Kind) -> str:
    """`service`, or `endpointslice.discovery.k8s.io` for a kind outside the core group."""
    group = kind.api_version.rpartition("/")[0]
    return f"{kind.name.lower()}.{group}" if group else kind.name.lower()


def resource_plural(kind: Kind) -> str:
    """`services`, `endpointslices.discovery.k8s.io`: how kubectl's errors name a kind."""
    group = kind.api_version.rpartition("/")[0]
    plural = kind.name.lower() + "s"
    return f"{plural}.{group}" if group else plural


def object_ref(obj: pb.Object) -> str:
    """`service/my-service`, as `-o name` and apply print it."""
    return f"{resource_type(kind_of(obj))}/{message_of(obj).metadata.name}"


def deleted_line(kind: Kind, name: str) -> str:
    """`service "my-service" deleted`."""
    return f'{resource_type(kind)} "{name}" deleted'


def not_found(kind: Kind, name: str) -> str:
    """`services "x" not found`, the registry's NotFound as kubectl words it."""
    return f'{resource_plural(kind)} "{name}" not found'


def _document(objects: Sequence[pb.Object], single: bool) -> dict[str, Any]:
    if single:
        return to_manifest(objects[0])
    return {
        "apiVersion": "v1",
        "items": [to_manifest(o) for o in objects],
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


def to_yaml(objects: Sequence[pb.Object], *, single: bool) -> str:
    """`-o yaml`: the one object when single, else a `kind: List` of them."""
    return yaml.safe_dump(
        _document(objects, single),
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 30,
    )


def to_json(objects: Sequence[pb.Object], *, single: bool) -> str:
    """`-o json`: the one object when single, else a `kind: List` of them."""
    return json.dumps(_document(objects, single), indent=4, ensure_ascii=False) + "\n"
