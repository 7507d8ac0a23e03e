"""The machinery of the registry fuzz tests: objects to apply (valid and not), one
client interface over the Registry in process and over gRPC, and the invariants."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from hypothesis import strategies as st

from ebpflb import labels
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.api.v1 import registry_pb2_grpc as pb_grpc
from ebpflb.objects import (
    KINDS,
    SERVICE_NAME_LABEL,
    Key,
    ManifestError,
    from_manifest,
    key_of,
    kind_of,
    message_of,
)
from ebpflb.registry.core import Reason, Registry, RegistryError
from ebpflb.registry.endpoints import MANAGED_BY, MANAGED_BY_LABEL, compute_slices
from ebpflb.registry.server import make_server
from ebpflb.registry.store import SqliteStore
from tests.fuzz.common import registry_owned

# Bugs of the registry that the generators step around, each shown by an xfail test
# in test_known_bugs.py. EBPFLB_FUZZ_KNOWN_BUGS=1 steps on them: the fuzzer finds them.
AVOID_KNOWN_BUGS = os.environ.get("EBPFLB_FUZZ_KNOWN_BUGS") != "1"

SERVICE_CIDR = "10.96.0.8/29"  # six addresses: nine Services can fill it
NODE_PORTS = (30075, 30084)  # ten, around the users' 30080
NODE_PORT_RANGE = f"{NODE_PORTS[0]}-{NODE_PORTS[1]}"

ADDED, MODIFIED, DELETED, BOOKMARK = (
    pb.WatchEvent.ADDED,
    pb.WatchEvent.MODIFIED,
    pb.WatchEvent.DELETED,
    pb.WatchEvent.BOOKMARK,
)

# ------------------------------------------------------------------ refusals

# The refusals a client may get; anything else (UNKNOWN, INTERNAL, another
# exception in process) is a crash. Named by their gRPC codes.
ALLOWED = frozenset(
    {"INVALID_ARGUMENT", "ALREADY_EXISTS", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE"}
)
_CODE_OF = {
    Reason.INVALID: "INVALID_ARGUMENT",
    Reason.ALREADY_EXISTS: "ALREADY_EXISTS",
    Reason.NOT_FOUND: "NOT_FOUND",
    Reason.CONFLICT: "FAILED_PRECONDITION",
    Reason.GONE: "OUT_OF_RANGE",
    Reason.UNAVAILABLE: "UNAVAILABLE",
}


class Refused(Exception):
    """The registry said no: a gRPC code name and the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unexpected(Exception):
    """What a client must never see: another exception, or a status outside ALLOWED."""


WatchEvents = list[tuple[int, pb.Object | None, int]]


class Client(Protocol):
    def apply(
        self, objects: list[pb.Object], dry_run: bool
    ) -> tuple[list[pb.Object], list[str]]: ...
    def delete(self, key: Key, grace: int | None) -> pb.Object: ...
    def get(self, key: Key) -> pb.Object: ...
    def list(self, kind: str, namespace: str, selector: str) -> tuple[list[pb.Object], int]: ...
    def watch(
        self, rv: str, kind: str, namespace: str, selector: str, count: int, refusal: bool = False
    ) -> WatchEvents:
        """rv "": the initial events up to the BOOKMARK. Else `count` events (the caller
        knows how many there are); with count 0, only whether the request is refused
        (`refusal`: the caller expects it to be, so it waits for it)."""
        ...

    def close(self) -> None: ...


def deterministic(registry: Registry) -> Registry:
    """The registry with its allocators' random choices seeded: Hypothesis must see the
    same outcomes when it replays a sequence (which keys exist decides what it draws)."""
    registry.service_range.range._rng = random.Random(0)
    registry.node_port_range._rng = random.Random(0)
    return registry


class InProcess:
    """The Registry itself, over a SqliteStore in a folder of its own."""

    def __init__(self, folder: Path, service_cidr: str = SERVICE_CIDR) -> None:
        self.folder = folder
        self.service_cidr = service_cidr
        self.registry = self._open()

    def _open(self) -> Registry:
        store = SqliteStore(str(self.folder / "registry.db"))
        registry = Registry(store, service_cidr=self.service_cidr, node_port_range=NODE_PORT_RANGE)
        return deterministic(registry)

    def reopen(self) -> None:
        self.registry.close()
        self.registry = self._open()

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RegistryError as e:
            raise Refused(_CODE_OF[e.reason], e.message) from None
        except Exception as e:
            raise Unexpected(f"{type(e).__name__}: {e}") from e

    def apply(self, objects: list[pb.Object], dry_run: bool) -> tuple[list[pb.Object], list[str]]:
        res = self._call(lambda: self.registry.apply(objects, dry_run=dry_run))
        return list(res.objects), list(res.results)

    def delete(self, key: Key, grace: int | None) -> pb.Object:
        obj: pb.Object = self._call(lambda: self.registry.delete(key, grace))
        return obj

    def get(self, key: Key) -> pb.Object:
        obj: pb.Object = self._call(lambda: self.registry.get(key))
        return obj

    def list(self, kind: str, namespace: str, selector: str) -> tuple[list[pb.Object], int]:
        items, rev = self._call(lambda: self.registry.list(kind, namespace, selector))
        return list(items), int(rev)

    def watch(
        self, rv: str, kind: str, namespace: str, selector: str, count: int, refusal: bool = False
    ) -> WatchEvents:
        # The stream's loop asks active() before each batch of (up to 1000) events: yes
        # once when there are events to read, so it never waits for more.
        calls = [0]

        def active() -> bool:
            calls[0] += 1
            return count > 0 and calls[0] == 1

        def run() -> WatchEvents:
            out: WatchEvents = []
            for typ, obj, rev in self.registry.watch(kind, namespace, selector, rv, active):
                out.append((typ, obj, rev))
                if typ == BOOKMARK and rv == "":
                    break
            return out

        events: WatchEvents = self._call(run)
        if rv != "" and len(events) < count:
            # More than one batch: resume after the last one seen, as a watcher does.
            last = events[-1][2] if events else int(rv)
            events += self.watch(str(last), kind, namespace, selector, count - len(events))
        return events

    def close(self) -> None:
        self.registry.close()


class OverGrpc:
    """The same Registry behind make_server on a unix socket, through the generated stub."""

    def __init__(self, folder: Path) -> None:
        self.registry = deterministic(
            Registry(
                SqliteStore(str(folder / "registry.db")),
                service_cidr=SERVICE_CIDR,
                node_port_range=NODE_PORT_RANGE,
            )
        )
        address = f"unix://{folder}/registry.sock"
        self.server, _ = make_server(self.registry, address, max_workers=16)
        self.server.start()
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.RegistryStub(self.channel)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except grpc.RpcError as e:
            code = e.code().name
            details = e.details() or ""
            if code not in ALLOWED:
                raise Unexpected(f"status {code}: {details}") from None
            raise Refused(code, details) from None

    def apply(self, objects: list[pb.Object], dry_run: bool) -> tuple[list[pb.Object], list[str]]:
        req = pb.ApplyRequest(objects=objects, dry_run=dry_run)
        resp: pb.ApplyResponse = self._call(lambda: self.stub.Apply(req, timeout=30))
        return list(resp.objects), list(resp.results)

    @staticmethod
    def _key(key: Key) -> pb.ObjectKey:
        return pb.ObjectKey(kind=key.kind, namespace=key.namespace, name=key.name)

    def delete(self, key: Key, grace: int | None) -> pb.Object:
        req = pb.DeleteRequest(key=self._key(key), grace_period_seconds=grace)
        resp: pb.DeleteResponse = self._call(lambda: self.stub.Delete(req, timeout=30))
        return resp.object

    def get(self, key: Key) -> pb.Object:
        req = pb.GetRequest(key=self._key(key))
        obj: pb.Object = self._call(lambda: self.stub.Get(req, timeout=30))
        return obj

    def list(self, kind: str, namespace: str, selector: str) -> tuple[list[pb.Object], int]:
        req = pb.ListRequest(kind=kind, namespace=namespace, label_selector=selector)
        resp: pb.ListResponse = self._call(lambda: self.stub.List(req, timeout=30))
        return list(resp.items), int(resp.resource_version)

    def watch(
        self, rv: str, kind: str, namespace: str, selector: str, count: int, refusal: bool = False
    ) -> WatchEvents:
        req = pb.WatchRequest(
            kind=kind, namespace=namespace, label_selector=selector, resource_version=rv
        )
        # With nothing to read, a refusal comes at once: a short deadline tells the two apart.
        stream = self.stub.Watch(req, timeout=30 if rv == "" or count or refusal else 0.3)
        out: WatchEvents = []

        def run() -> None:
            try:
                for ev in stream:
                    if ev.type == BOOKMARK and rv != "":
                        continue  # a heartbeat; not counted
                    obj = ev.object if ev.HasField("object") else None
                    out.append((ev.type, obj, int(ev.resource_version)))
                    if (ev.type == BOOKMARK and rv == "") or (rv != "" and len(out) == count):
                        break
            except grpc.RpcError as e:
                if count == 0 and not refusal and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return
                raise
            finally:
                stream.cancel()

        self._call(run)
        return out

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.registry.close()


@dataclass
class Sandbox:
    """A temporary folder for one registry, removed at the end."""

    folder: Path

    @classmethod
    def make(cls) -> Sandbox:
        return cls(Path(tempfile.mkdtemp(prefix="ebpflb-fuzz-")))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ------------------------------------------------------------------ objects to apply

NAMESPACES = ["", "default", "other"]
SERVICES = ["web", "db", "dns"]
PODS = ["p1", "p2", "p3", "p4"]
NODES = ["node1", "node2"]
HAND_SLICES = ["hand-1", "hand-2"]
LABEL_KEYS = ["app", "tier"]
LABEL_VALUES = ["web", "db", "front"]
PORT_NAMES = ["http", "dns", "metrics"]
POD_IPS = ["10.244.0.1", "10.244.0.2", "10.244.1.3", "10.244.1.4"]

# Weighted so that Services often select Pods: mostly `app`, mostly one namespace.
label_maps = st.one_of(
    st.builds(lambda v: {"app": v}, st.sampled_from(LABEL_VALUES[:2])),
    st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=2),
)
namespaces = st.sampled_from(["", "", "default", "other"])


def _meta(draw: st.DrawFn, name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": draw(label_maps)}
    ns = draw(namespaces)
    if namespaced and ns:
        meta["namespace"] = ns
    return meta


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    typ = draw(st.sampled_from([None, "ClusterIP", "NodePort"]))
    numbers = [80, 53, 443]
    if draw(st.integers(0, 9)) == 0:  # now and then one number twice: a Duplicate value
        numbers = draw(st.lists(st.sampled_from(numbers), min_size=1, max_size=3))
    else:
        numbers = draw(st.permutations(numbers))[: draw(st.integers(1, 3))]
    n = len(numbers)
    ports = []
    for i, number in enumerate(numbers):
        p: dict[str, Any] = {"port": number}
        if n > 1:
            p["name"] = f"p{i}"
        protocol = draw(st.sampled_from([None, "TCP", "UDP"]))
        if protocol:
            p["protocol"] = protocol
        target = draw(st.sampled_from([None, None, 8080, *PORT_NAMES]))
        if target is not None:
            p["targetPort"] = target
        if typ == "NodePort":
            node_port = draw(st.sampled_from([None, None, 30075, 30076, 30077, 30084]))
            if node_port:
                p["nodePort"] = node_port
        ports.append(p)
    spec: dict[str, Any] = {"ports": ports, "selector": draw(label_maps)}
    if draw(st.integers(0, 5)) == 0:
        spec["selector"] = {}  # endpoints by hand
    if typ:
        spec["type"] = typ
    cluster_ip = draw(st.sampled_from([None, None, None, "None", "10.96.0.10", "10.96.0.11"]))
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    if typ == "NodePort":
        etp = draw(st.sampled_from([None, "Cluster", "Local"]))
        if etp:
            spec["externalTrafficPolicy"] = etp
        if etp == "Local" and not AVOID_KNOWN_BUGS:  # it may be one of the Service's own
            hc = draw(st.sampled_from([None, 30077, 30078]))
            if hc:
                spec["healthCheckNodePort"] = hc
    if draw(st.integers(0, 4)) == 0:
        spec["sessionAffinity"] = "ClientIP"
    name = draw(st.sampled_from(SERVICES))
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(draw, name), "spec": spec}


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    ports = [
        {"name": name, "containerPort": draw(st.sampled_from([80, 8080, 53])), "protocol": proto}
        for name, proto in draw(
            st.lists(
                st.sampled_from([("http", "TCP"), ("dns", "UDP"), ("metrics", "TCP")]),
                unique=True,
                max_size=3,
            )
        )
    ]
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "nginx", "ports": ports}]}
    node = draw(st.sampled_from([None, *NODES]))
    if node:
        spec["nodeName"] = node
    status: dict[str, Any] = {}
    phase = draw(st.sampled_from([None, "Running", "Running", "Pending", "Succeeded", "Failed"]))
    if phase:
        status["phase"] = phase
    ip = draw(st.sampled_from([None, *POD_IPS, *POD_IPS]))
    if ip:
        status["podIP"] = ip
    ready = draw(st.sampled_from([None, "True", "False"]))
    if ready:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    name = draw(st.sampled_from(PODS))
    meta = _meta(draw, name)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


@st.composite
def nodes(draw: st.DrawFn) -> dict[str, Any]:
    i = draw(st.integers(0, len(NODES) - 1))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _meta(draw, NODES[i], namespaced=False),
        "spec": {"podCIDR": f"10.244.{i}.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": f"192.168.56.{11 + i}"}],
            "conditions": [{"type": "Ready", "status": draw(st.sampled_from(["True", "False"]))}],
        },
    }


@st.composite
def hand_slices(draw: st.DrawFn) -> dict[str, Any]:
    """EndpointSlices applied by hand (for Services without a selector)."""
    meta = _meta(draw, draw(st.sampled_from(HAND_SLICES)))
    meta["labels"] = {SERVICE_NAME_LABEL: draw(st.sampled_from(SERVICES))}
    endpoints = [
        {"addresses": [ip], "conditions": {"ready": True}}
        for ip in draw(st.lists(st.sampled_from(POD_IPS), unique=True, max_size=2))
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "", "protocol": "TCP", "port": 80}],
    }


@st.composite
def service_with_pods(draw: st.DrawFn) -> list[pb.Object]:
    """A Service and Pods it selects (some of them: ready or not, with the named port
    or not, running or finished), so that the endpoints controller has work."""
    svc = draw(services())
    svc["spec"]["selector"] = {"app": draw(st.sampled_from(LABEL_VALUES[:2]))}
    ns = svc["metadata"].get("namespace", "")
    out = [svc]
    for pod in draw(st.lists(pods(), min_size=1, max_size=3)):
        if draw(st.integers(0, 3)) > 0:
            pod["metadata"]["labels"] = dict(svc["spec"]["selector"])
            if ns:
                pod["metadata"]["namespace"] = ns
            else:
                pod["metadata"].pop("namespace", None)
        out.append(pod)
    return [from_manifest(d) for d in draw(st.permutations(out))]


def _set(obj: pb.Object, path: str, value: Any) -> None:
    """Set a field of the message in obj by a dotted path (repeated: the first item)."""
    msg: Any = message_of(obj)
    *parents, last = path.split(".")
    for part in parents:
        msg = getattr(msg, part)
        if hasattr(msg, "add"):
            msg = msg[0] if len(msg) else msg.add()
    if hasattr(getattr(msg, last), "append"):
        getattr(msg, last).append(value)
    else:
        setattr(msg, last, value)


# How an object is broken: (kind or "", field path, value). Some of these break only
# some objects (a nodePort on a ClusterIP Service), which is as well.
BREAKERS: list[tuple[str, str, Any]] = [
    ("", "metadata.name", "Bad_Name"),
    ("", "metadata.name", ""),
    ("", "metadata.namespace", "Not A Namespace"),
    ("", "api_version", "v2"),
    ("", "kind", "Gadget"),
    ("", "metadata.generation", -1),
    ("Service", "spec.ports.port", 0),
    ("Service", "spec.ports.port", 70000),
    ("Service", "spec.ports.protocol", "SCTP"),
    ("Service", "spec.ports.node_port", 80),
    ("Service", "spec.ports.node_port", 30085),
    ("Service", "spec.ports.target_port.str_val", "not_a_port_name"),
    ("Service", "spec.cluster_ip", "10.0.0.1"),
    ("Service", "spec.cluster_ip", "10.96.0.255"),
    ("Service", "spec.cluster_ip", "300.1.1.1"),
    ("Service", "spec.cluster_ips", "10.96.0.12"),
    ("Service", "spec.type", "LoadBalancer"),
    ("Service", "spec.session_affinity", "Sticky"),
    ("Service", "spec.external_traffic_policy", "Local"),
    ("Service", "spec.health_check_node_port", 80 if AVOID_KNOWN_BUGS else 30079),
    ("Service", "spec.ip_families", "IPv6"),
    ("Service", "spec.selector", None),
    ("Pod", "status.pod_ip", "999.1.1.1"),
    ("Pod", "spec.containers.ports.container_port", 0),
    ("Pod", "spec.containers.name", ""),
    ("Pod", "status.phase", "Dancing"),
    ("Node", "spec.pod_cidr", "10.244.0.1/24"),
    ("Node", "metadata.namespace", "default"),
    ("EndpointSlice", "address_type", "IPv6"),
    ("EndpointSlice", "endpoints.addresses", "nope"),
    ("EndpointSlice", "metadata.labels", None),
]


@st.composite
def breakage(draw: st.DrawFn, obj: pb.Object) -> pb.Object:
    """obj with one field set to something (usually) invalid."""
    kind = kind_of(obj).name
    choices = [b for b in BREAKERS if b[0] in ("", kind)]
    _, path, value = draw(st.sampled_from(choices))
    out = pb.Object()
    out.CopyFrom(obj)
    if path == "spec.selector":
        out.service.spec.selector["bad key!"] = "x"
    elif path == "metadata.labels":
        out.endpoint_slice.metadata.labels[MANAGED_BY_LABEL] = MANAGED_BY  # the registry's own
    else:
        _set(out, path, value)
    return out


def _manifest_object(doc: dict[str, Any]) -> pb.Object:
    return from_manifest(doc)


valid_objects = st.one_of(
    services().map(_manifest_object),
    pods().map(_manifest_object),
    nodes().map(_manifest_object),
    hand_slices().map(_manifest_object),
)


@st.composite
def batches(draw: st.DrawFn, users: list[pb.Object], broken: bool = True) -> list[pb.Object]:
    """What one Apply sends: objects valid by construction (which may still clash:
    two Services asking for one nodePort), the users' own manifests now and then, and
    in three batches out of ten one object that is not: broken, without a kind, or any
    protobuf at all."""
    batch = draw(st.lists(valid_objects, max_size=5))
    if users and draw(st.integers(0, 9)) == 0:
        batch.append(draw(st.sampled_from(users)))
    if broken and draw(st.integers(0, 9)) < 3:
        bad = draw(
            st.one_of(
                valid_objects.flatmap(breakage),
                st.just(pb.Object()),
                random_objects(),
            )
        )
        batch.insert(draw(st.integers(0, len(batch))), bad)
    out = []
    for obj in batch:  # copies: the registry must not keep or change what it was given
        copy = pb.Object()
        copy.CopyFrom(obj)
        out.append(copy)
    return out


def users_objects(docs: list[dict[str, Any]]) -> list[pb.Object]:
    out = []
    for d in docs:
        with contextlib.suppress(ManifestError):
            out.append(from_manifest(d))
    return out


# Selector strings: well-formed ones over the labels in use, and any text.
_SEL_ALPHABET = "app tier web db front , = ! ( ) in notin > < 1 - _ . / x \t"
selector_strings = st.one_of(
    st.just(""),
    st.builds(
        lambda parts: ",".join(parts),
        st.lists(
            st.one_of(
                st.builds(
                    lambda k, v: f"{k}={v}",
                    st.sampled_from(LABEL_KEYS),
                    st.sampled_from(LABEL_VALUES),
                ),
                st.builds(
                    lambda k, v: f"{k}!={v}",
                    st.sampled_from(LABEL_KEYS),
                    st.sampled_from(LABEL_VALUES),
                ),
                st.builds(lambda k: f"!{k}", st.sampled_from(LABEL_KEYS)),
                st.sampled_from(LABEL_KEYS),
                st.builds(lambda k: f"{k} in (web,db)", st.sampled_from(LABEL_KEYS)),
                st.builds(lambda k: f"{k} notin (front)", st.sampled_from(LABEL_KEYS)),
                st.just(f"{SERVICE_NAME_LABEL}=web"),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.lists(st.sampled_from(_SEL_ALPHABET.split(" ") + [" "]), max_size=8).map("".join),
    st.text(max_size=12),
)
kinds = st.sampled_from(["", "", *KINDS, "service", "Gadget"])
resource_versions = st.one_of(
    st.just(""),
    st.integers(-3, 400).map(str),
    st.sampled_from(["abc", "1.5", " 7", "0x10", "٣", "9" * 5000, "-0", "+1", "1_0"]),
)

# ------------------------------------------------------------------ the model


def matches(kind: str, namespace: str, selector: labels.Selector, key: Key, obj: pb.Object) -> bool:
    """What a List or Watch with these arguments selects (as documented in the proto)."""
    if kind and key.kind != kind:
        return False
    if namespace and key.namespace and key.namespace != namespace:
        return False
    return selector.matches(message_of(obj).metadata.labels)


def is_managed_slice(obj: pb.Object) -> bool:
    return (
        obj.WhichOneof("kind") == "endpoint_slice"
        and obj.endpoint_slice.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY
    )


def check_invariants(
    items: list[pb.Object], revision: int, service_cidr: str = SERVICE_CIDR
) -> None:
    """What must hold of the registry's whole state after every step."""
    by_key = {key_of(o): o for o in items}
    assert len(by_key) == len(items), "two objects with one key"
    assert [key_of(o) for o in items] == sorted(by_key), "List is not sorted by key"
    versions = [int(message_of(o).metadata.resource_version) for o in items]
    assert all(0 < v <= revision for v in versions), (versions, revision)
    assert len(set(versions)) == len(versions), "two objects with one resource version"

    cidr = ipaddress.ip_network(service_cidr)
    cluster_ips: dict[str, Key] = {}
    node_ports: dict[int, Key] = {}
    svcs = {k: o.service for k, o in by_key.items() if k.kind == "Service"}
    for key, svc in svcs.items():
        spec = svc.spec
        assert list(spec.cluster_ips) == [spec.cluster_ip], (key, spec.cluster_ips)
        if spec.cluster_ip != "None":
            ip = ipaddress.ip_address(spec.cluster_ip)
            assert ip in cidr and ip not in (cidr.network_address, cidr.broadcast_address), key
            assert spec.cluster_ip not in cluster_ips, (key, cluster_ips[spec.cluster_ip])
            cluster_ips[spec.cluster_ip] = key
        mine = {p.node_port for p in spec.ports}
        if spec.type == "NodePort":
            assert 0 not in mine, key
            if spec.external_traffic_policy == "Local":
                assert spec.health_check_node_port, key
                assert spec.health_check_node_port not in mine, (key, "healthCheckNodePort")
                mine.add(spec.health_check_node_port)
            else:
                assert spec.health_check_node_port == 0, key
        else:
            assert mine <= {0} and spec.health_check_node_port == 0, key
            mine = set()
        for port in mine:
            assert NODE_PORTS[0] <= port <= NODE_PORTS[1], (key, port)
            assert port not in node_ports, (key, port, node_ports[port])
            node_ports[port] = key

    # The endpoints controller, as a model: compute_slices of the pods each selects.
    pods = [o.pod for k, o in by_key.items() if k.kind == "Pod"]
    want: dict[Key, pb.Object] = {}
    for key, svc in svcs.items():
        if not svc.spec.selector:
            continue
        chosen = [
            p
            for p in pods
            if (p.metadata.namespace or "default") == key.namespace
            and labels.matches_map(svc.spec.selector, p.metadata.labels)
        ]
        for es in compute_slices(svc, chosen):
            obj = pb.Object(endpoint_slice=es)
            want[key_of(obj)] = obj
    have = {k: registry_owned(o) for k, o in by_key.items() if is_managed_slice(o)}
    assert sorted(have) == sorted(want), "managed EndpointSlices differ from the model"
    for k, obj in want.items():
        assert have[k] == obj, k


def replay(state: dict[Key, pb.Object], events: WatchEvents) -> None:
    for typ, obj, _rev in events:
        assert obj is not None
        key = key_of(obj)
        if typ == DELETED:
            assert key in state, f"DELETED {key} that was not there"
            del state[key]
        else:
            assert typ in (ADDED, MODIFIED)
            assert (key in state) == (typ == MODIFIED), f"{typ} of {key}"
            state[key] = obj


def existing(items: list[pb.Object]) -> Iterator[Key]:
    for o in items:
        yield key_of(o)


# ------------------------------------------------------------------ any protobuf object

_INT_BOUNDS = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}
_small_texts = st.one_of(
    # Without control characters and line breaks while the registry puts names in its
    # messages as they are, which breaks them in lines.
    st.text(
        st.characters(
            codec="utf-8",
            exclude_categories=["Cc", "Cs", "Zl", "Zp"] if AVOID_KNOWN_BUGS else ["Cs"],
        ),
        max_size=10,
    ),
    st.sampled_from(["", "None", "TCP", "UDP", "NodePort", "Local", "10.96.0.10", "http", "True"]),
)


@st.composite
def random_message(draw: st.DrawFn, desc: Any, depth: int = 0) -> Any:
    """A message of type desc with arbitrary fields set to arbitrary (typed) values."""
    from google.protobuf import message_factory
    from google.protobuf.descriptor import FieldDescriptor as F

    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            for k, v in draw(st.dictionaries(_small_texts, _small_texts, max_size=3)).items():
                getattr(msg, f.name)[k] = v
            continue
        count = draw(st.integers(0, 3)) if f.is_repeated else 1
        for _ in range(count):
            if f.type == F.TYPE_MESSAGE:
                if depth >= 4 or f.message_type.full_name == "google.protobuf.Timestamp":
                    sub = message_factory.GetMessageClass(f.message_type)()
                else:
                    sub = draw(random_message(f.message_type, depth + 1))
                if f.is_repeated:
                    getattr(msg, f.name).add().CopyFrom(sub)
                else:
                    getattr(msg, f.name).CopyFrom(sub)
                continue
            if f.type == F.TYPE_STRING:
                value: Any = draw(_small_texts)
            elif f.type == F.TYPE_BOOL:
                value = draw(st.booleans())
            else:
                low, high = _INT_BOUNDS["int32" if f.type == F.TYPE_INT32 else "int64"]
                value = draw(st.integers(low, high) | st.sampled_from([0, 1, 80, 30080, -1]))
            if f.is_repeated:
                getattr(msg, f.name).append(value)
            else:
                setattr(msg, f.name, value)
    return msg


@st.composite
def random_objects(draw: st.DrawFn) -> pb.Object:
    kind = draw(st.sampled_from(list(KINDS.values())))
    obj = pb.Object()
    getattr(obj, kind.field).CopyFrom(draw(random_message(kind.message.DESCRIPTOR)))
    return obj
