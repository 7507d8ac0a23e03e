"""The registry's gRPC server: translates requests to Registry calls and errors to status codes."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.api.v1 import registry_pb2_grpc as pb_grpc
from ebpflb.objects import Key
from ebpflb.registry.core import Reason, Registry, RegistryError
from ebpflb.registry.store import open_store

log = logging.getLogger("ebpflb.registry")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Registry"].full_name

_CODES = {
    Reason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.GONE: grpc.StatusCode.OUT_OF_RANGE,
    Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def _abort(context: grpc.ServicerContext, e: RegistryError) -> NoReturn:
    context.abort(_CODES[e.reason], e.message)
    raise AssertionError("unreachable")  # abort() raises


def _key(k: pb.ObjectKey) -> Key:
    return Key(k.kind, k.namespace, k.name)


class RegistryServicer(pb_grpc.RegistryServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> pb.ApplyResponse:
        try:
            res = self.registry.apply(list(request.objects), dry_run=request.dry_run)
        except RegistryError as e:
            _abort(context, e)
        return pb.ApplyResponse(objects=res.objects, results=res.results)

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

    def Watch(
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchEvent]:
        try:
            for typ, obj, rev in self.registry.watch(
                request.kind,
                request.namespace,
                request.label_selector,
                request.resource_version,
                active=context.is_active,
            ):
                ev = pb.WatchEvent(type=typ, resource_version=str(rev))  # type: ignore[arg-type]
                if obj is not None:
                    ev.object.CopyFrom(obj)
                yield ev
        except RegistryError as e:
            _abort(context, e)


def _listen_address(listen: str) -> str:
    """A gRPC bind address; for unix:// the folder is made and a stale socket removed."""
    if listen.startswith("unix://"):
        path = Path(listen[len("unix://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        return f"unix://{path}"
    return listen


def make_server(registry: Registry, listen: str, max_workers: int = 64) -> tuple[grpc.Server, int]:
    """A server (not yet started) for registry on listen, and the port it bound."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=opts)
    pb_grpc.add_RegistryServicer_to_server(RegistryServicer(registry), server)
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
    address = _listen_address(listen)
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix://"):
        raise OSError(f"cannot listen on {listen}")
    return server, port


def run(
    listen: str = "unix:///run/ebpflb/registry.sock",
    store_url: str = "sqlite:///var/lib/ebpflb/registry.db",
    service_cidr: str = "10.96.0.0/12",
    node_port_range: str = "30000-32767",
) -> None:
    """Serve until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s registry %(levelname)s %(message)s")
    registry = Registry(
        open_store(store_url), service_cidr=service_cidr, node_port_range=node_port_range
    )
    server, port = make_server(registry, listen)
    server.start()
    if listen.startswith("unix://"):
        os.chmod(listen[len("unix://") :], 0o600)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "serving ebpflb.v1.Registry on %s (store %s, service CIDR %s, node ports %s, revision %d)",
        listen if listen.startswith("unix://") else f"{listen} (port {port})",
        store_url,
        service_cidr,
        node_port_range,
        registry.revision,
    )
    stop.wait()
    log.info("shutting down")
    registry.close()
    server.stop(grace=1).wait()
