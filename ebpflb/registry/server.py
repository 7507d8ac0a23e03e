"""The registry's gRPC server: listeners (unix socket, mTLS TCP), who may call what, limits,
and the translation of requests to Registry calls and of errors to status codes."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.api.v1 import registry_pb2_grpc as pb_grpc
from ebpflb.objects import Key, key_of
from ebpflb.registry import auth
from ebpflb.registry.core import (
    ApplyResult,
    Reason,
    Registry,
    RegistryError,
    WatchBatch,
    WatchItem,
)
from ebpflb.registry.store import open_store

log = logging.getLogger("ebpflb.registry")

MIB = 1024 * 1024
# What the server sends at most (a List of a big registry); clients accept as much.
MAX_SEND_BYTES = 64 * MIB
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Registry"].full_name
DEFAULT_LISTEN = "unix:///run/ebpflb/registry.sock"

_CODES = {
    Reason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.GONE: grpc.StatusCode.OUT_OF_RANGE,
    Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class ConfigError(ValueError):
    """A server configuration that cannot work (the message names the flag)."""


@dataclass(frozen=True)
class Limits:
    """How much the registry takes in and holds; each refusal is RESOURCE_EXHAUSTED.

    Every stream (Watch, and health Watch) holds a server thread while it is open,
    so the pool has max_watches threads for streams plus unary_workers that
    streams can never take: streams over the limit are refused at once."""

    max_message_bytes: int = 16 * MIB  # a request larger than this: refused by gRPC itself
    max_apply_objects: int = 50_000  # objects in one Apply
    max_objects: int = 1_000_000  # objects stored, EndpointSlices included
    max_watches: int = 256  # streams open at once
    unary_workers: int = 32

    @property
    def workers(self) -> int:
        return self.max_watches + self.unary_workers


@dataclass(frozen=True)
class ServerTls:
    """The registry's certificate and key, and the CA its clients' certificates must
    come from (PEM files)."""

    cert: str
    key: str
    client_ca: str

    def credentials(self) -> grpc.ServerCredentials:
        """mTLS server credentials; ConfigError when a file is missing or they do not fit."""
        cert, key, ca = (
            _read(self.cert, "--tls-cert"),
            _read(self.key, "--tls-key"),
            _read(self.client_ca, "--tls-client-ca"),
        )
        try:
            certificate = x509.load_pem_x509_certificate(cert)
            private = serialization.load_pem_private_key(key, password=None)
            x509.load_pem_x509_certificates(ca)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"TLS files: not PEM certificates and key: {e}") from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if certificate.public_key().public_bytes(der, pub) != private.public_key().public_bytes(
            der, pub
        ):
            raise ConfigError(f"--tls-key {self.key} is not the key of --tls-cert {self.cert}")
        if certificate.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
            raise ConfigError(
                f"--tls-cert {self.cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d}"
            )
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None


def _abort(context: grpc.ServicerContext, e: RegistryError) -> NoReturn:
    context.abort(_CODES[e.reason], e.message)


def _key(k: pb.ObjectKey) -> Key:
    return Key(k.kind, k.namespace, k.name)


class RegistryServicer(pb_grpc.RegistryServicer):
    def __init__(self, registry: Registry, limits: Limits | None = None) -> None:
        self.registry = registry
        self.limits = limits or Limits()
        # Applies are serialized anyway (the registry holds one lock per Apply); this
        # one makes "count, then store" one step, so concurrent Applies cannot
        # together pass max_objects.
        self._apply_lock = threading.Lock()

    # An ApplyResponse serialized here (see _apply_response); _Guard's serializer passes it on.
    def Apply(  # type: ignore[override]
        self, request: pb.ApplyRequest, context: grpc.ServicerContext
    ) -> bytes:
        n, limit = len(request.objects), self.limits.max_apply_objects
        if n > limit:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many objects in one Apply: {n} > {limit} (the registry's "
                "--max-apply-objects); nothing was stored: apply them in smaller batches",
            )
        with self._apply_lock:
            new = self._new_objects(request.objects)
            stored, limit = stored_objects(self.registry), self.limits.max_objects
            if new and stored + new > limit:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many objects: {stored} stored + {new} new > {limit} (the registry's "
                    "--max-objects); nothing was stored",
                )
            try:
                res = self.registry.apply(list(request.objects), dry_run=request.dry_run)
            except RegistryError as e:
                _abort(context, e)
        return _apply_response(res)

    def _new_objects(self, objects: Sequence[pb.Object]) -> int:
        """How many of objects are not stored yet (each key counted once)."""
        return self.registry.missing({key_of(o) for o in objects if o.WhichOneof("kind")})

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        grace = request.grace_period_seconds if request.HasField("grace_period_seconds") else None
        try:
            obj = self.registry.delete(_key(request.key), grace)
        except RegistryError as e:
            _abort(context, e)
        return pb.DeleteResponse(object=obj)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.Object:
        try:
            return self.registry.get(_key(request.key))
        except RegistryError as e:
            _abort(context, e)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        try:
            items, rev = self.registry.list(request.kind, request.namespace, request.label_selector)
        except RegistryError as e:
            _abort(context, e)
        return pb.ListResponse(items=items, resource_version=str(rev))

    # WatchEvents serialized here (see _event_bytes); _Guard's serializer passes them on.
    def Watch(  # type: ignore[override]
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        args = (request.kind, request.namespace, request.label_selector, request.resource_version)
        try:
            for batch in self.registry.watch_batches(*args, active=context.is_active):
                if request.allow_batches:
                    yield from _batch_messages(batch)
                else:
                    yield from map(_event_bytes, batch)
        except RegistryError as e:
            _abort(context, e)


WATCH_BATCH_BYTES = 4 * MIB  # a BATCH message is cut when it grows past this
_BYTES = [bytes([n]) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTES[n]
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(message: type[Message], field: str, wire_type: int) -> bytes:
    """A field's tag: its number and wire type (0 a varint, 2 bytes)."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type)


_TYPE, _OBJECT = _tag(pb.WatchEvent, "type", 0), _tag(pb.WatchEvent, "object", 2)
_VERSION, _BATCH = _tag(pb.WatchEvent, "resource_version", 2), _tag(pb.WatchEvent, "batch", 2)
_OBJECTS, _RESULTS = _tag(pb.ApplyResponse, "objects", 2), _tag(pb.ApplyResponse, "results", 2)


def _apply_response(res: ApplyResult) -> bytes:
    """An ApplyResponse serialized by hand around the objects' bytes as they were
    stored: copying thousands of objects into a response costs more than the Apply."""
    out: list[bytes] = []
    for obj, data in zip(res.objects, res.wire, strict=True):
        data = data or obj.SerializeToString()
        out += (_OBJECTS, _varint(len(data)), data)
    for result in res.results:
        text = result.encode()
        out += (_RESULTS, _varint(len(text)), text)
    return b"".join(out)


def _event_bytes(item: WatchItem) -> bytes:
    """One WatchEvent, serialized by hand around its object's bytes: an object is
    serialized once, when it is stored, however many watchers it goes to."""
    typ, obj, rev, data = item
    out = [_TYPE, _varint(typ)]
    if obj is not None:
        data = data or obj.SerializeToString()
        out += (_OBJECT, _varint(len(data)), data)
    version = str(rev).encode()
    out += (_VERSION, _varint(len(version)), version)
    return b"".join(out)


def _batch_messages(batch: WatchBatch) -> Iterator[bytes]:
    """Events that were ready together as few serialized WatchEvents: one event as
    itself, more as BATCH messages of at most about WATCH_BATCH_BYTES each."""
    if len(batch) == 1:
        yield _event_bytes(batch[0])
        return
    head = _TYPE + _varint(pb.WatchEvent.BATCH)
    out = [head]
    size = 0
    for item in batch:
        event = _event_bytes(item)
        out += (_BATCH, _varint(len(event)), event)
        size += len(event)
        if size >= WATCH_BATCH_BYTES:
            yield b"".join(out)
            out, size = [head], 0
    if len(out) > 1:
        yield b"".join(out)


def stored_objects(registry: Registry) -> int:
    """How many objects the registry holds."""
    return registry.object_count


def lookup(registry: Registry, key: Key) -> pb.Object | None:
    try:
        return registry.get(key)
    except RegistryError as e:
        if e.reason == Reason.NOT_FOUND:
            return None
        raise


# ------------------------------------------------------------------ authorization and streams


class _Slots:
    """A counter of open streams with a ceiling."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> Callable[[], None] | None:
        """A release function (safe to call more than once), or None when all are taken."""
        with self._lock:
            if self.open >= self.limit:
                return None
            self.open += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if not done.is_set():
                    done.set()
                    self.open -= 1

        return release


class _Guard(grpc.ServerInterceptor):
    """Runs before every handler: who is calling (auth.identify), may they
    (auth.authorize: PERMISSION_DENIED), and for streams, is there a slot
    (RESOURCE_EXHAUSTED)."""

    def __init__(self, registry: Registry, streams: _Slots, insecure_tcp: bool) -> None:
        self.registry = registry
        self.streams = streams
        self.insecure_tcp = insecure_tcp

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        des, ser = handler.request_deserializer, _bytes_or(handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), des, ser
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), des, ser
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary), des, ser
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._stream(method, handler.stream_stream), des, ser
        )

    def _check(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        try:
            auth_context = cast(Mapping[str, list[bytes]], context.auth_context())
            who = auth.identify(auth_context, context.peer(), insecure_tcp=self.insecure_tcp)
            auth.authorize(who, method, request, lambda k: lookup(self.registry, k))
        except auth.Unauthenticated as e:
            log.warning("refused %s from %s: %s", method, context.peer(), e)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except auth.Forbidden as e:
            log.warning("refused %s from %s: %s", method, context.peer(), e)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))

    def _unary(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            self._check(method, request, context)
            return behavior(request, context)

        return guarded

    def _stream(
        self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Any:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._check(method, request, context)
            release = self.streams.take()
            if release is None:
                log.warning("refused %s from %s: too many watches", method, context.peer())
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many watches: {self.streams.limit} streams are open (the registry's "
                    "--max-watches); try again later",
                )
            # Whichever comes first: the handler ends (its thread is free again), or
            # the RPC ends (cancelled, client gone) while the handler sits in a wait.
            if not context.add_callback(release):
                release()
            try:
                yield from behavior(request, context)
            finally:
                release()

        return guarded


def _bytes_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that passes on what a handler serialized itself (Watch)."""
    if serialize is None:
        return None
    ser = serialize

    def serialized(message: Any) -> bytes:
        return message if isinstance(message, bytes) else ser(message)

    return serialized


# ------------------------------------------------------------------ listeners


def is_unix(address: str) -> bool:
    return address.startswith("unix:")


def check_listeners(listen: Sequence[str], tls: ServerTls | None, insecure_tcp: bool) -> None:
    """ConfigError unless every TCP listener has mTLS, or --insecure-tcp says it may not."""
    if not listen:
        raise ConfigError("no --listen address")
    tcp = [a for a in listen if not is_unix(a)]
    if tls is not None and insecure_tcp:
        raise ConfigError("give either --tls-cert/--tls-key/--tls-client-ca or --insecure-tcp")
    if tcp and tls is None and not insecure_tcp:
        raise ConfigError(
            f"--listen {tcp[0]}: a TCP listener requires mTLS: give --tls-cert, --tls-key "
            "and --tls-client-ca (`ebpflb certs` makes them), or --insecure-tcp for an "
            "unauthenticated, unencrypted one on a private network (every client is admin)"
        )
    if tls is not None and not tcp:
        log.warning("TLS files given but no TCP listener: the unix socket never uses TLS")


def _prepare_unix(address: str) -> Path:
    """The socket's path; its folder is made (0755) and a stale socket removed."""
    path = Path(address[len("unix://") :] if address.startswith("unix://") else address[5:])
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True)
    mode = path.parent.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        log.warning(
            "%s is writable by others: they could replace the registry's socket", path.parent
        )
    if path.is_socket():
        path.unlink()
    return path


def make_server(
    registry: Registry,
    listen: str | Sequence[str],
    max_workers: int | None = None,
    *,
    tls: ServerTls | None = None,
    insecure_tcp: bool = False,
    limits: Limits | None = None,
) -> tuple[grpc.Server, int]:
    """A server (not yet started) for registry on every listen address, and the port
    its (last) TCP listener bound (0 with only unix sockets).

    A unix:// listener is plain gRPC, its socket mode 0600 (only its owner, root for
    the service, can connect; its callers are admin). A host:port listener uses
    mTLS (tls), or with insecure_tcp plain gRPC whose callers are all admin."""
    addresses = [listen] if isinstance(listen, str) else list(listen)
    server, ports = build_server(
        registry, addresses, max_workers, tls=tls, insecure_tcp=insecure_tcp, limits=limits
    )
    tcp = [p for a, p in ports.items() if not is_unix(a)]
    return server, tcp[-1] if tcp else 0


def build_server(
    registry: Registry,
    addresses: Sequence[str],
    max_workers: int | None = None,
    *,
    tls: ServerTls | None = None,
    insecure_tcp: bool = False,
    limits: Limits | None = None,
) -> tuple[grpc.Server, dict[str, int]]:
    """make_server's work: the server, and the port each address bound (0 for unix)."""
    limits = limits or Limits()
    check_listeners(addresses, tls, insecure_tcp)
    credentials = tls.credentials() if tls is not None else None
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    guard = _Guard(registry, _Slots(limits.max_watches), insecure_tcp)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers or limits.workers, thread_name_prefix="grpc"
        ),
        interceptors=[guard],
        options=opts,
    )
    pb_grpc.add_RegistryServicer_to_server(RegistryServicer(registry, limits), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    ports: dict[str, int] = {}
    for address in addresses:
        if is_unix(address):
            path = _prepare_unix(address)
            old = os.umask(0o077)  # the socket is born 0600: no moment where others can connect
            try:
                server.add_insecure_port(f"unix://{path}")
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            ports[address] = 0
            continue
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        ports[address] = port
    return server, ports


def run(
    listen: str | Sequence[str] = DEFAULT_LISTEN,
    store_url: str = "sqlite:///var/lib/ebpflb/registry.db",
    service_cidr: str = "10.96.0.0/12",
    node_port_range: str = "30000-32767",
    *,
    tls: ServerTls | None = None,
    insecure_tcp: bool = False,
    limits: Limits | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s registry %(levelname)s %(message)s")
    addresses = [listen] if isinstance(listen, str) else list(listen)
    limits = limits or Limits()
    check_listeners(addresses, tls, insecure_tcp)  # before the store is opened
    if tls is not None:
        tls.credentials()
    registry = Registry(
        open_store(store_url), service_cidr=service_cidr, node_port_range=node_port_range
    )
    try:
        server, ports = build_server(
            registry, addresses, tls=tls, insecure_tcp=insecure_tcp, limits=limits
        )
    except BaseException:
        registry.close()
        raise
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for address, port in ports.items():
        if is_unix(address):
            how = "plain, socket mode 0600: callers are admin"
        elif tls is not None:
            how = f"port {port}, mTLS: roles from client certificates"
        else:
            how = f"port {port}, INSECURE (--insecure-tcp): every caller is admin"
            log.warning("%s: unauthenticated and unencrypted; use it on a private network", address)
        log.info("listening on %s (%s)", address, how)
    log.info(
        "serving ebpflb.v1.Registry (store %s, service CIDR %s, node ports %s, revision %d; "
        "limits: %d-byte messages, %d objects per Apply, %d objects, %d watches)",
        store_url,
        service_cidr,
        node_port_range,
        registry.revision,
        limits.max_message_bytes,
        limits.max_apply_objects,
        limits.max_objects,
        limits.max_watches,
    )
    # The kernel may deliver SIGTERM to any thread (gRPC's own too), and Python runs the
    # handler only when the main thread next executes bytecode: an untimed wait could sleep
    # through it for ever (seen once: a registry alive 17 minutes after SIGTERM).
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    registry.close()
    server.stop(grace=1).wait()
