"""A small typed client of the registry's gRPC API, for the CLI and the node agent."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import grpc

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.api.v1 import registry_pb2_grpc as pb_grpc
from ebpflb.objects import Key

DEFAULT_ADDRESS = "unix:///run/ebpflb/registry.sock"
DEFAULT_TIMEOUT = 30.0
# The registry sends messages up to this size (a List of a big registry).
MAX_RECEIVE_BYTES = 64 * 1024 * 1024

# The reason kubectl shows in "Error from server (Reason): ..." for each gRPC status.
_REASONS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "Invalid",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.FAILED_PRECONDITION: "Conflict",
    grpc.StatusCode.ABORTED: "Conflict",
    grpc.StatusCode.OUT_OF_RANGE: "Expired",
    grpc.StatusCode.PERMISSION_DENIED: "Forbidden",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthorized",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "TooManyRequests",
    grpc.StatusCode.DEADLINE_EXCEEDED: "Timeout",
    grpc.StatusCode.UNIMPLEMENTED: "MethodNotAllowed",
}

# gRPC's "failed to connect to all addresses; last error: UNKNOWN: unix:/x.sock: connect: ..."
# says the address twice: keep "connect: ...".
_CONNECT_NOISE = re.compile(r"^failed to connect to all addresses; last error: \w+: \S+: ")


# gRPC's own refusal of a request over the server's receive limit.
_TOO_LARGE = "SERVER: Received message larger than max"


class RegistryError(Exception):
    """An error the registry answered with (or gRPC made up for it)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    @property
    def reason(self) -> str:
        """kubectl's word for the error: Invalid, NotFound, AlreadyExists, Conflict..."""
        return _REASONS.get(self.code, "InternalError")

    @property
    def not_found(self) -> bool:
        return self.code == grpc.StatusCode.NOT_FOUND


class RegistryUnavailable(RegistryError):
    """The registry could not be reached (nothing listens, or it did not answer in time)."""

    def __init__(self, address: str, code: grpc.StatusCode, why: str) -> None:
        super().__init__(code, f"cannot reach the registry at {address}: {why}")
        self.address = address
        self.why = why


class TlsError(ValueError):
    """TLS files that cannot be used (the message names the file)."""


@dataclass(frozen=True)
class TlsConfig:
    """mTLS to a registry's TCP listener: the CA that signed the registry's
    certificate, and this client's certificate and key (PEM files; made by
    `ebpflb certs`). Without cert and key the registry refuses the handshake.

    server_name replaces the host the registry's certificate must name (by default
    the host of the address dialled)."""

    ca: str
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise TlsError("a client certificate needs its key, and a key its certificate")
        ca = _read(self.ca, "CA certificate")
        if not self.cert:
            return grpc.ssl_channel_credentials(ca)
        return grpc.ssl_channel_credentials(
            ca, _read(self.key, "client key"), _read(self.cert, "client certificate")
        )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{what} {path}: {e.strerror}") from None


def _handshake_hint(details: str, tls: TlsConfig | None) -> str:
    """What a TLS failure most likely means, for a message gRPC leaves cryptic."""
    if "Peer name" in details:
        return " (issue the registry's certificate with this address: --ip or --dns)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return " (the registry's certificate is not signed by the CA in --tls-ca)"
    if details.endswith("Socket closed") or "WRONG_VERSION_NUMBER" in details:
        if tls is None:
            return " (does the registry require mTLS? give --tls-ca, --tls-cert and --tls-key)"
        return (
            " (the registry ended the TLS handshake: it refuses a client without a "
            "certificate, or with one that is expired or not signed by its client CA; "
            "its log says which)"
        )
    return ""


class Watch:
    """A running Watch stream: iterate for events, cancel() from any thread to stop it.
    When its registry goes away the client's next call goes to the next address: a
    watch started again from the last revision seen resumes there."""

    def __init__(self, client: RegistryClient, call: Any, index: int) -> None:
        self._client = client
        self._call = call
        self._index = index
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[pb.WatchEvent]:
        """Every event, one by one (a BATCH message's events in order)."""
        for events in self.messages():
            yield from events

    def messages(self) -> Iterator[Sequence[pb.WatchEvent]]:
        """The events message by message: a BATCH message's events together (what the
        registry had ready at once), any other event alone."""
        try:
            for ev in self._call:
                yield ev.batch if ev.type == pb.WatchEvent.BATCH else (ev,)
        except grpc.RpcError as e:
            if self._cancelled.is_set() and _call(e).code() == grpc.StatusCode.CANCELLED:
                return
            raise self._client._failover(e, self._index) from None

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()


class RegistryClient:
    """The registry's five calls with Python types and errors.

    address is a gRPC target: `unix:///path` or `host:port`, or several of them
    separated by commas (registries sharing one etcd store): calls go to one until it
    is unavailable, then to the next. A host:port is dialled with mTLS when tls is
    given; a unix socket is always plain (it is local, and its callers are admin).
    Unary calls fail fast when nothing listens and give up after `timeout` seconds;
    every failure is a RegistryError (RegistryUnavailable when no registry can be
    reached). Bad TLS files raise TlsError at once.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TlsConfig | None = None,
    ) -> None:
        self.addresses = [a.strip() for a in address.split(",") if a.strip()] or [address]
        self.timeout = timeout
        self.tls = None if all(a.startswith("unix:") for a in self.addresses) else tls
        self._current = 0
        self._channels = [self._dial(a) for a in self.addresses]
        self._stubs = [pb_grpc.RegistryStub(ch) for ch in self._channels]

    def _dial(self, address: str) -> grpc.Channel:
        opts: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if self.tls is None or address.startswith("unix:"):
            return grpc.insecure_channel(address, options=opts)
        if self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.secure_channel(address, self.tls.credentials(), options=opts)

    @property
    def address(self) -> str:
        """The registry calls go to now."""
        return self.addresses[self._current]

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def wait_ready(self, timeout: float) -> None:
        """Block until a registry is connected (calls then go to it);
        RegistryUnavailable after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, channel in enumerate(self._channels):
                wait = min(0.5, max(deadline - time.monotonic(), 0.01))
                try:
                    grpc.channel_ready_future(channel).result(timeout=wait)
                except grpc.FutureTimeoutError:
                    continue
                self._current = i
                return
            if time.monotonic() >= deadline:
                raise RegistryUnavailable(
                    ",".join(self.addresses),
                    grpc.StatusCode.UNAVAILABLE,
                    f"not ready after {timeout:g}s",
                )

    # ---------------------------------------------------------------- calls

    def apply(self, objects: Sequence[pb.Object], *, dry_run: bool = False) -> pb.ApplyResponse:
        """Store all objects atomically; the response has each stored object and
        kubectl's word for what happened to it (created / configured / unchanged)."""
        req = pb.ApplyRequest(objects=list(objects), dry_run=dry_run)
        resp: pb.ApplyResponse = self._unary("Apply", req)
        return resp

    def delete(self, key: Key, *, grace_period_seconds: int | None = None) -> pb.Object:
        """Delete one object; returns it as it was (or, for a Pod with a grace
        period, as it is now: terminating)."""
        req = pb.DeleteRequest(key=_key(key))
        if grace_period_seconds is not None:
            req.grace_period_seconds = grace_period_seconds
        resp: pb.DeleteResponse = self._unary("Delete", req)
        return resp.object

    def get(self, key: Key) -> pb.Object:
        obj: pb.Object = self._unary("Get", pb.GetRequest(key=_key(key)))
        return obj

    def list(
        self, kind: str = "", namespace: str = "", label_selector: str = ""
    ) -> pb.ListResponse:
        """Objects of one kind ("" = all) in one namespace ("" = all), with the
        revision they were read at."""
        req = pb.ListRequest(kind=kind, namespace=namespace, label_selector=label_selector)
        resp: pb.ListResponse = self._unary("List", req)
        return resp

    def watch(
        self,
        kind: str = "",
        namespace: str = "",
        label_selector: str = "",
        resource_version: str = "",
    ) -> Watch:
        """Changes after resource_version ("" = the current state first, then a
        BOOKMARK, then changes). The stream has no deadline."""
        req = pb.WatchRequest(
            kind=kind,
            namespace=namespace,
            label_selector=label_selector,
            resource_version=resource_version,
            allow_batches=True,
        )
        i = self._current
        return Watch(self, self._stubs[i].Watch(req), i)

    # ---------------------------------------------------------------- helpers

    def _unary(self, method: str, request: Any) -> Any:
        """Call method on the current registry, and on each next one while the one
        called is unavailable."""
        unavailable: RegistryUnavailable | None = None
        for _ in self.addresses:
            i = self._current
            try:
                return getattr(self._stubs[i], method)(request, timeout=self.timeout)
            except grpc.RpcError as e:
                error = self._failover(e, i)
            if not isinstance(error, RegistryUnavailable):
                raise error
            unavailable = error
        assert unavailable is not None
        if len(self.addresses) > 1:
            # None answered: say so, with the last one's reason.
            where = ", ".join(self.addresses)
            raise RegistryUnavailable(where, unavailable.code, unavailable.why)
        raise unavailable

    def _failover(self, e: grpc.RpcError, i: int) -> RegistryError:
        """The error of a call to address i; when that registry is unavailable the
        calls that follow go to the next address."""
        error = self._error(e, self.addresses[i])
        if isinstance(error, RegistryUnavailable) and self._current == i:
            self._current = (i + 1) % len(self.addresses)
        return error

    def _error(self, e: grpc.RpcError, address: str) -> RegistryError:
        code = _call(e).code()
        details = _call(e).details() or str(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            why = _CONNECT_NOISE.sub("", details)
            if not address.startswith("unix:"):
                why += _handshake_hint(why, self.tls)
            return RegistryUnavailable(address, code, why)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RegistryUnavailable(address, code, f"no answer within {self.timeout:g}s")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_TOO_LARGE):
            details += " (the registry's --max-message-bytes): nothing was stored"
        return RegistryError(code, details)


def _call(e: grpc.RpcError) -> grpc.Call:
    """The RpcError a stub raises is also the failed call, which has code() and details()."""
    return cast(grpc.Call, e)


def _key(key: Key) -> pb.ObjectKey:
    return pb.ObjectKey(kind=key.kind, namespace=key.namespace, name=key.name)
