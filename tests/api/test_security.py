"""mTLS, roles and limits: a real registry on 127.0.0.1 (ephemeral ports) with certificates from
ebpflb.certs, and the gRPC status every refused client or role gets."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ebpflb import certs, cli
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.client import RegistryClient, RegistryError, TlsConfig
from ebpflb.objects import Key, from_manifest
from ebpflb.registry import auth
from ebpflb.registry.core import Registry
from ebpflb.registry.server import ConfigError, Limits, ServerTls, make_server
from ebpflb.registry.store import SqliteStore
from tests.conftest import EBPFLB, wait_serving

pytestmark = pytest.mark.api

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    dir: Path  # the registry's CA, its certificate, and clients'
    other: Path  # another CA, with an admin certificate of its own

    def tls(self, name: str | None, ca_dir: Path | None = None) -> TlsConfig:
        """A client's TLS files: name's certificate (None: no certificate at all)."""
        d = ca_dir or self.dir
        if name is None:
            return TlsConfig(ca=str(self.dir / "ca.crt"))
        return TlsConfig(
            ca=str(self.dir / "ca.crt"), cert=str(d / f"{name}.crt"), key=str(d / f"{name}.key")
        )

    def server(self) -> ServerTls:
        return ServerTls(
            str(self.dir / "registry.crt"), str(self.dir / "registry.key"), str(self.dir / "ca.crt")
        )


def _roleless(d: Path) -> None:
    """A client certificate from the right CA whose subject names no role (OU=ops)."""
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ebpflb"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"),
            x509.NameAttribute(NameOID.COMMON_NAME, "bob"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "roleless.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "roleless.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    certs.issue(d, "registry", "server", ips=["127.0.0.1"], dns=["localhost"])
    certs.issue(d, "admin", "admin")
    certs.issue(d, "viewer", "viewer")
    certs.issue(d, "node1", "node")
    certs.issue(
        d,
        "expired",
        "admin",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        days=30,
    )
    _roleless(d)
    other = tmp_path_factory.mktemp("other-ca")
    certs.init_ca(other)
    certs.issue(other, "admin", "admin")
    return Pki(d, other)


# ------------------------------------------------------------------ a served registry


def svc(name: str) -> pb.Object:
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
        }
    )


def node(name: str) -> pb.Object:
    return from_manifest({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})


def pod(name: str, on: str, ip: str = "10.244.1.5") -> pb.Object:
    return from_manifest(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"nodeName": on, "containers": [{"name": "c", "image": "nginx"}]},
            "status": {"phase": "Running", "podIP": ip},
        }
    )


@dataclass
class Served:
    registry: Registry
    port: int
    unix: str
    pki: Pki

    @property
    def tcp(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, name: str | None, ca_dir: Path | None = None) -> RegistryClient:
        return RegistryClient(self.tcp, timeout=10, tls=self.pki.tls(name, ca_dir))

    def admin(self) -> RegistryClient:
        return RegistryClient(self.unix, timeout=10)


@contextmanager
def serve(tmp_path: Path, pki: Pki, limits: Limits | None = None) -> Iterator[Served]:
    registry = Registry(SqliteStore(str(tmp_path / "r.db")))
    unix = f"unix://{tmp_path}/run/registry.sock"
    server, port = make_server(registry, [unix, "127.0.0.1:0"], tls=pki.server(), limits=limits)
    server.start()
    try:
        yield Served(registry, port, unix, pki)
    finally:
        server.stop(0).wait()
        registry.close()


@pytest.fixture
def served(tmp_path: Path, pki: Pki) -> Iterator[Served]:
    with serve(tmp_path, pki) as s:
        with s.admin() as c:
            c.apply([node("node1"), node("node2"), svc("web"), pod("p1", "node1")])
            c.apply([pod("p2", "node2", "10.244.2.5")])
        yield s


def outcome(fn: Callable[[], object]) -> tuple[grpc.StatusCode | None, str]:
    """(status, message) of a call through RegistryClient: (None, "") when it succeeded."""
    try:
        fn()
    except RegistryError as e:
        return e.code, e.details
    return None, ""


# ------------------------------------------------------------------ refused clients

# Refused in the TLS handshake: the client never gets to make a call, so it sees
# UNAVAILABLE ("Socket closed": the server ended the handshake), and the client adds
# what that most likely means. The registry's log names the reason (gRPC's
# "Handshake failed ... PEER_DID_NOT_RETURN_A_CERTIFICATE", "certificate has
# expired", "unable to get local issuer certificate", "unsupported certificate purpose").
HANDSHAKE_REFUSED = (
    "Socket closed (the registry ended the TLS handshake: it refuses a client without a "
    "certificate, or with one that is expired or not signed by its client CA; its log says which)"
)


@pytest.mark.parametrize(
    ("client", "details"),
    [
        ("no client certificate", HANDSHAKE_REFUSED),
        ("certificate from another CA", HANDSHAKE_REFUSED),
        ("expired certificate", HANDSHAKE_REFUSED),
        ("the registry's server certificate used as a client's", HANDSHAKE_REFUSED),
        (
            "plain gRPC (no TLS)",
            "Socket closed (does the registry require mTLS? give --tls-ca, --tls-cert and "
            "--tls-key)",
        ),
    ],
)
def test_clients_without_a_valid_certificate_are_refused_in_the_handshake(
    served: Served, client: str, details: str
) -> None:
    make: dict[str, Callable[[], RegistryClient]] = {
        "no client certificate": lambda: served.client(None),
        "certificate from another CA": lambda: served.client("admin", served.pki.other),
        "expired certificate": lambda: served.client("expired"),
        "the registry's server certificate used as a client's": lambda: served.client("registry"),
        "plain gRPC (no TLS)": lambda: RegistryClient(served.tcp, timeout=10),
    }
    before = served.registry.revision
    with make[client]() as c:
        for call in (lambda: c.list("Service"), lambda: c.apply([svc("intruder")])):
            code, message = outcome(call)
            assert code == UNAVAILABLE
            assert message == f"cannot reach the registry at {served.tcp}: {details}"
    assert served.registry.revision == before


def test_a_certificate_from_our_ca_without_a_role_is_permission_denied(served: Served) -> None:
    with served.client("roleless") as c:
        code, message = outcome(lambda: c.list("Service"))
    assert code == DENIED
    assert message == (
        'certificate "bob" has no ebpflb client role: its subject needs O=ebpflb and OU admin, '
        "node or viewer (a node's with CN=system:node:NAME)"
    )


def test_a_client_checks_the_registrys_certificate(served: Served) -> None:
    # A client that trusts another CA refuses the registry (its own handshake fails).
    tls = TlsConfig(
        ca=str(served.pki.other / "ca.crt"),
        cert=str(served.pki.other / "admin.crt"),
        key=str(served.pki.other / "admin.key"),
    )
    with RegistryClient(served.tcp, timeout=10, tls=tls) as c:
        code, message = outcome(lambda: c.list("Service"))
    assert code == UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert message.endswith("(the registry's certificate is not signed by the CA in --tls-ca)")
    # A name the certificate does not have (here by override) is refused too.
    wrong = dataclasses.replace(served.pki.tls("viewer"), server_name="control")
    with RegistryClient(served.tcp, timeout=10, tls=wrong) as c:
        assert outcome(lambda: c.list("Service")) == (
            UNAVAILABLE,
            f"cannot reach the registry at {served.tcp}: Peer name control is not in peer "
            "certificate (issue the registry's certificate with this address: --ip or --dns)",
        )
    # The certificate names 127.0.0.1 and localhost: both work.
    with RegistryClient(f"localhost:{served.port}", tls=served.pki.tls("viewer")) as c:
        assert [o.service.metadata.name for o in c.list("Service").items] == ["web"]


# ------------------------------------------------------------------ roles

VIEWER_READS_ONLY = "the viewer role only reads (Get, List, Watch)"
NODE_WRITES = "the node role writes only its own Node and its own Pods' status"
NODE_VERBS = "the node role reads, and writes only its own Node and its own Pods' status"


def _status(c: RegistryClient, name: str, ip: str) -> object:
    obj = c.get(Key("Pod", "default", name))
    obj.pod.status.pod_ip = ip
    return c.apply([obj])


def _relabel(c: RegistryClient, name: str) -> object:
    obj = c.get(Key("Pod", "default", name))
    obj.pod.metadata.labels["app"] = "payments"
    return c.apply([obj])


def _watch(c: RegistryClient) -> object:
    w = c.watch("Service")
    first = next(iter(w))
    w.cancel()
    return first


ACTIONS: dict[str, Callable[[RegistryClient], object]] = {
    "List": lambda c: c.list("Service"),
    "Get": lambda c: c.get(Key("Service", "default", "web")),
    "Watch": _watch,
    "Apply a Service": lambda c: c.apply([svc("web2")]),
    "Delete a Service": lambda c: c.delete(Key("Service", "default", "web")),
    "Delete its own Pod": lambda c: c.delete(Key("Pod", "default", "p1")),
    "Apply its own Node": lambda c: c.apply([node("node1")]),
    "Apply another Node": lambda c: c.apply([node("node2")]),
    "Apply its own Pod's status": lambda c: _status(c, "p1", "10.244.1.6"),
    "Apply another node's Pod's status": lambda c: _status(c, "p2", "10.244.2.6"),
    "Apply a new Pod on itself": lambda c: c.apply([pod("p3", "node1")]),
    "Apply a Pod moved onto itself": lambda c: c.apply([pod("p2", "node1")]),
    "Apply new labels on its own Pod": lambda c: _relabel(c, "p1"),
    "Apply a Service and its own Node at once": lambda c: c.apply([node("node1"), svc("x")]),
}

# (certificate, action, status (None: allowed), message)
ROLE_TABLE: list[tuple[str, str, grpc.StatusCode | None, str]] = [
    ("admin", action, None, "") for action in ACTIONS
] + [
    ("viewer", "List", None, ""),
    ("viewer", "Get", None, ""),
    ("viewer", "Watch", None, ""),
    (
        "viewer",
        "Apply a Service",
        DENIED,
        f'viewer "viewer" may not call Apply: {VIEWER_READS_ONLY}',
    ),
    (
        "viewer",
        "Delete a Service",
        DENIED,
        f'viewer "viewer" may not call Delete: {VIEWER_READS_ONLY}',
    ),
    ("node1", "List", None, ""),
    ("node1", "Get", None, ""),
    ("node1", "Watch", None, ""),
    ("node1", "Apply its own Node", None, ""),
    ("node1", "Apply its own Pod's status", None, ""),
    (
        "node1",
        "Apply a Service",
        DENIED,
        f'node "node1" may not apply Service "default/web2": {NODE_WRITES}',
    ),
    ("node1", "Delete a Service", DENIED, f'node "node1" may not call Delete: {NODE_VERBS}'),
    ("node1", "Delete its own Pod", DENIED, f'node "node1" may not call Delete: {NODE_VERBS}'),
    (
        "node1",
        "Apply another Node",
        DENIED,
        'node "node1" may not apply Node "node2": a node writes only its own Node',
    ),
    (
        "node1",
        "Apply another node's Pod's status",
        DENIED,
        'node "node1" may not apply Pod "default/p2": it is bound to node "node2", not to this one',
    ),
    (
        "node1",
        "Apply a new Pod on itself",
        DENIED,
        'node "node1" may not apply Pod "default/p3": a node changes only the status of '
        "Pods that exist",
    ),
    (
        "node1",
        "Apply a Pod moved onto itself",
        DENIED,
        'node "node1" may not apply Pod "default/p2": it is bound to node "node2", not to this one',
    ),
    (
        "node1",
        "Apply new labels on its own Pod",
        DENIED,
        'node "node1" may not apply Pod "default/p1": a node changes only the status of its '
        "Pods, not their labels, annotations or spec",
    ),
    (
        "node1",
        "Apply a Service and its own Node at once",
        DENIED,
        f'node "node1" may not apply Service "default/x": {NODE_WRITES}',
    ),
]


@pytest.mark.parametrize(
    ("who", "action", "code", "message"),
    ROLE_TABLE,
    ids=[f"{who}: {action}" for who, action, _, _ in ROLE_TABLE],
)
def test_roles(
    served: Served, who: str, action: str, code: grpc.StatusCode | None, message: str
) -> None:
    before = served.registry.revision
    with served.client(who) as c:
        assert outcome(lambda: ACTIONS[action](c)) == (code, message)
    if code is not None:
        assert served.registry.revision == before  # nothing stored, not even part of a batch


def test_a_node_status_update_is_stored(served: Served) -> None:
    with served.client("node1") as c:
        _status(c, "p1", "10.244.1.9")
        ready = node("node1")
        ready.node.status.conditions.add(type="Ready", status="True")
        c.apply([ready])
    with served.admin() as c:
        assert c.get(Key("Pod", "default", "p1")).pod.status.pod_ip == "10.244.1.9"
        assert c.get(Key("Node", "", "node1")).node.status.conditions[0].status == "True"


def test_the_unix_socket_is_admin_and_mode_0600(tmp_path: Path, pki: Pki) -> None:
    with serve(tmp_path, pki) as s:
        path = Path(s.unix[len("unix://") :])
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755  # made by the registry
        with s.admin() as c:  # no certificate: the socket's callers are admin
            c.apply([svc("a")])
            c.delete(Key("Service", "default", "a"))


# ------------------------------------------------------------------ listeners need TLS


def test_a_tcp_listener_without_tls_is_refused(tmp_path: Path) -> None:
    registry = Registry(SqliteStore(str(tmp_path / "r.db")))
    try:
        with pytest.raises(ConfigError) as e:
            make_server(registry, "127.0.0.1:0")
        assert str(e.value) == (
            "--listen 127.0.0.1:0: a TCP listener requires mTLS: give --tls-cert, --tls-key "
            "and --tls-client-ca (`ebpflb certs` makes them), or --insecure-tcp for an "
            "unauthenticated, unencrypted one on a private network (every client is admin)"
        )
    finally:
        registry.close()


def test_the_registry_command_refuses_tcp_without_tls(tmp_path: Path, pki: Pki) -> None:
    store = f"sqlite://{tmp_path}/r.db"
    base = [*EBPFLB, "registry", "--store", store, "--listen", "127.0.0.1:0"]
    p = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "error: --listen 127.0.0.1:0: a TCP listener requires mTLS: give --tls-cert, --tls-key "
        "and --tls-client-ca (`ebpflb certs` makes them), or --insecure-tcp for an "
        "unauthenticated, unencrypted one on a private network (every client is admin)"
    ]
    assert not (tmp_path / "r.db").exists()  # refused before the store was opened
    d = pki.dir
    p = subprocess.run(
        [*base, "--tls-cert", str(d / "registry.crt")], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 1
    assert p.stderr == (
        "error: --tls-key, --tls-client-ca missing: mTLS needs --tls-cert, --tls-key and "
        "--tls-client-ca\n"
    )
    p = subprocess.run(
        [
            *base,
            *("--tls-cert", str(d / "registry.crt"), "--tls-key", str(d / "admin.key")),
            *("--tls-client-ca", str(d / "ca.crt")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr == (
        f"error: --tls-key {d}/admin.key is not the key of --tls-cert {d}/registry.crt\n"
    )


def test_insecure_tcp_is_plain_and_everyone_is_admin(tmp_path: Path) -> None:
    registry = Registry(SqliteStore(str(tmp_path / "r.db")))
    server, port = make_server(registry, "127.0.0.1:0", insecure_tcp=True)
    server.start()
    try:
        with RegistryClient(f"127.0.0.1:{port}", timeout=10) as c:
            c.apply([svc("a")])
            c.delete(Key("Service", "default", "a"))
    finally:
        server.stop(0).wait()
        registry.close()


# ------------------------------------------------------------------ limits

LIMITS = Limits(
    max_message_bytes=64 * 1024, max_apply_objects=3, max_objects=5, max_watches=2, unary_workers=4
)


@pytest.fixture
def limited(tmp_path: Path, pki: Pki) -> Iterator[Served]:
    with serve(tmp_path, pki, LIMITS) as s:
        yield s


def test_a_message_over_the_size_limit(limited: Served) -> None:
    big = svc("big")
    big.service.metadata.annotations["blob"] = "x" * 100_000
    with limited.client("admin") as c:
        code, message = outcome(lambda: c.apply([big]))
        assert (code, message) == (
            EXHAUSTED,
            "SERVER: Received message larger than max (100062 vs. 65536) "
            "(the registry's --max-message-bytes): nothing was stored",
        )
        assert c.list().items == []


def test_too_many_objects_in_one_apply(limited: Served) -> None:
    with limited.client("admin") as c:
        code, message = outcome(lambda: c.apply([node(f"n{i}") for i in range(4)]))
        assert (code, message) == (
            EXHAUSTED,
            "too many objects in one Apply: 4 > 3 (the registry's --max-apply-objects); "
            "nothing was stored: apply them in smaller batches",
        )
        assert c.list().items == []
        c.apply([node(f"n{i}") for i in range(3)])


def test_too_many_objects_stored(limited: Served) -> None:
    with limited.client("admin") as c:
        c.apply([node("n0"), node("n1"), node("n2")])
        c.apply([node("n3"), node("n4")])  # 5: the limit itself is allowed
        rev = limited.registry.revision
        code, message = outcome(lambda: c.apply([node("n2"), node("n5")]))
        assert (code, message) == (
            EXHAUSTED,
            "too many objects: 5 stored + 1 new > 5 (the registry's --max-objects); "
            "nothing was stored",
        )
        assert limited.registry.revision == rev
        assert len(c.list().items) == 5
        updated = node("n0")
        updated.node.metadata.labels["zone"] = "a"
        assert c.apply([updated]).results == ["configured"]  # updates add nothing
        c.delete(Key("Node", "", "n4"))
        c.apply([node("n5")])


def _watch_accepted(c: RegistryClient) -> tuple[grpc.StatusCode | None, str, object]:
    w = c.watch("Node")
    try:
        next(iter(w))
    except RegistryError as e:
        return e.code, e.details, None
    return None, "", w


def test_too_many_watches_and_slots_come_back(limited: Served) -> None:
    with limited.client("viewer") as a, limited.client("viewer") as b:
        first = a.watch("Node")
        assert next(iter(first)).type == pb.WatchEvent.BOOKMARK
        second = b.watch("Node")
        assert next(iter(second)).type == pb.WatchEvent.BOOKMARK
        with limited.client("node1") as c:
            code, message, _ = _watch_accepted(c)
            assert (code, message) == (
                EXHAUSTED,
                "too many watches: 2 streams are open (the registry's --max-watches); "
                "try again later",
            )
            # Watches hold threads of their own: unary calls still have theirs.
            for _ in range(10):
                c.list("Node")
            with limited.client("admin") as admin:
                admin.apply([node("n0")])
            # A cancelled watch gives its slot back...
            first.cancel()
            assert _eventually_accepted(c)
        # ...and so does a client that goes away without cancelling.
        b.close()
        with limited.client("node1") as c:
            assert _eventually_accepted(c)


def _eventually_accepted(c: RegistryClient, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _, w = _watch_accepted(c)
        if code is None:
            assert w is not None
            w.cancel()  # type: ignore[attr-defined]
            return True
        assert code == EXHAUSTED
        time.sleep(0.1)
    return False


def test_cli_limit_defaults_are_the_servers() -> None:
    defaults = Limits()
    assert {k: v[0] for k, v in cli.REGISTRY_LIMITS.items()} == {
        "max_message_bytes": defaults.max_message_bytes,
        "max_apply_objects": defaults.max_apply_objects,
        "max_objects": defaults.max_objects,
        "max_watches": defaults.max_watches,
    }
    # The pool has a thread for every watch and unary_workers more.
    assert defaults.workers == defaults.max_watches + defaults.unary_workers


# ------------------------------------------------------------------ the policy without a server


def test_identify() -> None:
    insecure = {"transport_security_type": [b"insecure"]}
    assert auth.identify(insecure, "unix:", insecure_tcp=False) == auth.LOCAL
    assert auth.identify(insecure, "ipv4:10.0.0.1:5", insecure_tcp=True) == auth.INSECURE_TCP
    with pytest.raises(auth.Unauthenticated, match="without TLS"):
        auth.identify(insecure, "ipv4:10.0.0.1:5", insecure_tcp=False)
    with pytest.raises(auth.Unauthenticated, match="no client certificate"):
        auth.identify({"transport_security_type": [b"ssl"]}, "ipv4:x", insecure_tcp=False)


def test_methods_nobody_classified_are_admin_only() -> None:
    viewer = auth.Identity(auth.Role.VIEWER, "v")
    with pytest.raises(auth.Forbidden, match='viewer "v" may not call Compact'):
        auth.authorize(viewer, "/ebpflb.v1.Registry/Compact", None, lambda k: None)
    auth.authorize(viewer, "/grpc.health.v1.Health/Check", None, lambda k: None)
    auth.authorize(auth.LOCAL, "/ebpflb.v1.Registry/Compact", None, lambda k: None)


# ------------------------------------------------------------------ the CLI, end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_cli_over_mtls(tmp_path: Path, pki: Pki) -> None:
    d = pki.dir
    port = _free_port()
    unix = f"unix://{tmp_path}/registry.sock"
    log = open(tmp_path / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *EBPFLB,
            "registry",
            *("--listen", unix, "--listen", f"127.0.0.1:{port}"),
            *("--store", f"sqlite://{tmp_path}/r.db"),
            *("--tls-cert", str(d / "registry.crt"), "--tls-key", str(d / "registry.key")),
            *("--tls-client-ca", str(d / "ca.crt")),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_serving(unix, proc)
        manifest = tmp_path / "svc.yaml"
        manifest.write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
            "spec: {selector: {app: web}, ports: [{port: 80}]}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("EBPFLB_")}

        def ebpflb(
            *args: str, cert: str | None = None, extra: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
            flags = ["--registry", f"127.0.0.1:{port}", "--tls-ca", str(d / "ca.crt")]
            if cert:
                flags += ["--tls-cert", str(d / f"{cert}.crt"), "--tls-key", str(d / f"{cert}.key")]
            return subprocess.run(
                [*EBPFLB, *flags, *args],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, **(extra or {})},
            )

        p = ebpflb("apply", "-f", str(manifest), cert="admin")
        assert (p.returncode, p.stdout, p.stderr) == (0, "service/web created\n", "")
        p = ebpflb("get", "svc", cert="viewer")
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[0].split() == [
            "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE",
        ]  # fmt: skip
        assert p.stdout.splitlines()[1].split()[:2] == ["web", "ClusterIP"]
        # The flags after the subcommand work too, and so does the environment.
        p = subprocess.run(
            [*EBPFLB, "get", "svc", "-o", "name", "--registry", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **env,
                "EBPFLB_TLS_CA": str(d / "ca.crt"),
                "EBPFLB_TLS_CERT": str(d / "viewer.crt"),
                "EBPFLB_TLS_KEY": str(d / "viewer.key"),
            },
        )
        assert (p.returncode, p.stdout) == (0, "service/web\n"), p.stderr
        p = ebpflb("delete", "svc", "web", cert="viewer")
        assert (p.returncode, p.stderr) == (
            1,
            'Error from server (Forbidden): viewer "viewer" may not call Delete: '
            "the viewer role only reads (Get, List, Watch)\n",
        )
        p = ebpflb("apply", "-f", str(manifest), cert="node1")
        assert (p.returncode, p.stderr) == (
            1,
            'Error from server (Forbidden): node "node1" may not apply Service "default/web": '
            "the node role writes only its own Node and its own Pods' status\n",
        )
        p = ebpflb("get", "svc")
        assert (p.returncode, p.stderr) == (
            1,
            f"error: cannot reach the registry at 127.0.0.1:{port}: {HANDSHAKE_REFUSED}\n",
        )
        p = ebpflb("get", "svc", cert="admin", extra={"EBPFLB_TLS_CA": "/nonexistent"})
        assert p.returncode == 0  # a flag wins over the environment
        p = subprocess.run(
            [*EBPFLB, "--registry", f"127.0.0.1:{port}", "--tls-ca", "/nonexistent", "get", "svc"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert (p.returncode, p.stderr) == (
            1,
            "error: CA certificate /nonexistent: No such file or directory\n",
        )
        # The unix socket needs no certificate (and ignores the TLS flags).
        p = subprocess.run(
            [*EBPFLB, "--registry", unix, "--tls-ca", "/nonexistent", "get", "svc", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert (p.returncode, p.stdout) == (0, "service/web\n"), p.stderr
        registry_log = (tmp_path / "registry.log").read_text()
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in registry_log
        assert "refused /ebpflb.v1.Registry/Delete from ipv4:127.0.0.1:" in registry_log
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
