"""Who a registry client is (its certificate, or the local unix socket) and what its role may do.

Roles (the certificate's OU, see ebpflb.certs):
  admin   everything
  viewer  reads: Get, List, Watch (and health checks, reflection)
  node    reads, and Apply of its own Node, and of the status of existing Pods bound to it
A client on the unix socket is admin: only root can open it (mode 0600). A client
of a TCP listener started with --insecure-tcp is admin too: that is for a private
test network only. Anything not listed here is admin-only, so a new RPC is closed
until someone decides who may call it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from ebpflb import certs
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import Key, key_of, kind_of, message_of
from ebpflb.validation import apply_defaults

REGISTRY = "/ebpflb.v1.Registry/"
APPLY = REGISTRY + "Apply"
DELETE = REGISTRY + "Delete"
READS = frozenset({REGISTRY + "Get", REGISTRY + "List", REGISTRY + "Watch"})
# Services every authenticated client may use: they only describe the server.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class Role(StrEnum):
    ADMIN = "admin"
    NODE = "node"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Identity:
    """An authenticated client: its role, its name (the certificate's CN, or how it
    came in), and for a node the Node it is."""

    role: Role
    name: str
    node: str = ""

    def __str__(self) -> str:
        return f'{self.role} "{self.node or self.name}"'


LOCAL = Identity(Role.ADMIN, "local (unix socket)")
INSECURE_TCP = Identity(Role.ADMIN, "anyone (--insecure-tcp)")


class Unauthenticated(Exception):
    """No identity at all (UNAUTHENTICATED)."""


class Forbidden(Exception):
    """An identity whose role may not do this (PERMISSION_DENIED)."""


@functools.lru_cache(maxsize=1024)
def _holder(pem: bytes) -> certs.Holder:
    return certs.holder_of_pem(pem)


def identify(
    auth_context: Mapping[str, Iterable[bytes]], peer: str, *, insecure_tcp: bool
) -> Identity:
    """The identity of a caller from grpc's auth_context() and peer().

    With TLS the handshake has already checked the certificate (our CA, in date,
    client purpose): here only its subject matters."""
    security = b"".join(auth_context.get("transport_security_type", ()))
    if security == b"ssl":
        pems = list(auth_context.get("x509_pem_cert", ()))
        if not pems:
            raise Unauthenticated("no client certificate")
        try:
            h = _holder(pems[0])
        except certs.CertError as e:
            raise Unauthenticated(str(e)) from None
        if h.role not in certs.CLIENT_ROLES:
            raise Forbidden(
                f'certificate "{h.name}" has no ebpflb client role: its subject needs '
                f"O={certs.ORGANIZATION} and OU admin, node or viewer "
                f"(a node's with CN={certs.NODE_CN_PREFIX}NAME)"
            )
        return Identity(Role(h.role), h.name, h.node)
    if peer.startswith("unix:"):
        return LOCAL
    if insecure_tcp:
        return INSECURE_TCP
    raise Unauthenticated(f"{peer} came in without TLS on a listener that requires it")


# A stored object by key (None when there is none), for the node rules.
Lookup = Callable[[Key], "pb.Object | None"]


def authorize(who: Identity, method: str, request: object, lookup: Lookup) -> None:
    """Raise Forbidden unless who may call method with request."""
    if who.role == Role.ADMIN:
        return
    if method in READS or method.startswith(OPEN_SERVICES):
        return
    verb = method.rsplit("/", 1)[-1]
    if who.role == Role.VIEWER:
        raise Forbidden(f"{who} may not call {verb}: the viewer role only reads (Get, List, Watch)")
    if method == APPLY and isinstance(request, pb.ApplyRequest):
        for obj in request.objects:
            _node_may_apply(who, obj, lookup)
        return
    raise Forbidden(
        f"{who} may not call {verb}: the node role reads, and writes only its own Node "
        "and its own Pods' status"
    )


def _node_may_apply(who: Identity, given: pb.Object, lookup: Lookup) -> None:
    if given.WhichOneof("kind") is None:
        return  # the registry refuses it as invalid
    obj = pb.Object()
    obj.CopyFrom(given)
    apply_defaults(obj)
    key = key_of(obj)
    what = f'{kind_of(obj).name} "{key.namespace + "/" if key.namespace else ""}{key.name}"'
    refused = f"{who} may not apply {what}"
    if key.kind == "Node":
        if key.name != who.node:
            raise Forbidden(f"{refused}: a node writes only its own Node")
        return
    if key.kind != "Pod":
        raise Forbidden(
            f"{refused}: the node role writes only its own Node and its own Pods' status"
        )
    stored = lookup(key)
    if stored is None:
        raise Forbidden(f"{refused}: a node changes only the status of Pods that exist")
    for node in (stored.pod.spec.node_name, obj.pod.spec.node_name):
        if node != who.node:
            bound = f'node "{node}"' if node else "no node"
            raise Forbidden(f"{refused}: it is bound to {bound}, not to this one")
    old, new = message_of(stored), message_of(obj)
    if (
        old.spec != new.spec
        or dict(old.metadata.labels) != dict(new.metadata.labels)
        or dict(old.metadata.annotations) != dict(new.metadata.annotations)
    ):
        raise Forbidden(
            f"{refused}: a node changes only the status of its Pods, "
            "not their labels, annotations or spec"
        )
