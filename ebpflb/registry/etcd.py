"""The registry's store on an etcd cluster, shared by several registries.

It speaks etcd's v3 JSON gateway (/v3/kv/range, /v3/kv/txn, /v3/watch; keys and values
in base64) over plain HTTP, so it needs no client library. Under PREFIX (default
/ebpflb) it keeps:

- `revision`: the registries' shared logical revision (resourceVersions are these);
- `objects/<kind>/<namespace>/<name>`: each object, serialized;
- `events/<first revision, 20 digits>`: one key per committed transaction, its events;
- `compacted`: events at or below it are gone.

Every commit is one etcd transaction that succeeds only if `revision` is still the
one the committing registry last saw: writes from all registries are serialized on
that key, which is what keeps ClusterIPs and nodePorts unique across registries.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlparse

from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import message_of
from ebpflb.registry.store import (
    DELETED,
    Event,
    Snapshot,
    StoreConflict,
    StoreError,
    StoreGap,
    _key_from_text,
    _key_text,
)

Endpoint = tuple[str, int]
DEFAULT_PREFIX = "/ebpflb"
PAGE = 1000  # keys per range request


def parse_etcd_url(url: str) -> tuple[list[Endpoint], str]:
    """etcd://HOST:PORT[,HOST:PORT...][/PREFIX] as the members and the key prefix."""
    u = urlparse(url)
    usage = "expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
    if not u.netloc:
        raise ValueError(f"store URL {url!r} names no etcd member: {usage}")
    if u.query or u.params or u.fragment:
        raise ValueError(f"store URL {url!r}: no query or fragment allowed: {usage}")
    endpoints = []
    for part in u.netloc.split(","):
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")  # [::1]:2379
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"store URL {url!r}: {part!r} is not HOST:PORT: {usage}")
        endpoints.append((host, int(port)))
    return endpoints, u.path.rstrip("/") or DEFAULT_PREFIX


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


class _Retry(Exception):
    """This member cannot answer now (down, stopping, electing a leader): try another."""


# gRPC codes etcd answers with when another member may do better: DeadlineExceeded
# ("request timed out"), Unavailable ("leader changed", "no leader", stopping).
_RETRY_CODES = {4, 14}
# etcd's limits that an Apply can run into, and the member flag that raises each.
_HINTS = {
    "too many operations in txn request": "start the etcd members with a larger --max-txn-ops",
    "request is too large": "start the etcd members with a larger --max-request-bytes",
}


class Gateway:
    """Calls to etcd's JSON gateway on several members: each call goes to the member
    that answered last and moves on to the next one when that member cannot answer
    within `timeout`, until one does or `patience` seconds have passed."""

    def __init__(self, endpoints: list[Endpoint], timeout: float = 2.0, patience: float = 8.0):
        self.endpoints = endpoints
        self.timeout = timeout
        self.patience = patience
        self._preferred = 0
        self._local = threading.local()  # each thread's keep-alive connections

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        deadline = time.monotonic() + self.patience
        delay = 0.05
        errors: dict[str, str] = {}
        while True:
            first = self._preferred
            for i in range(len(self.endpoints)):
                n = (first + i) % len(self.endpoints)
                try:
                    doc = self._post(n, path, data)
                except _Retry as e:
                    errors[self._name(n)] = str(e)
                    continue
                self._preferred = n
                return doc
            if time.monotonic() + delay > deadline:
                why = "; ".join(f"{k}: {v}" for k, v in errors.items())
                raise StoreError(f"etcd: no member answered within {self.patience:g}s ({why})")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _name(self, n: int) -> str:
        host, port = self.endpoints[n]
        return f"{host}:{port}"

    def _connection(self, n: int) -> http.client.HTTPConnection:
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("c", {})
        conn = conns.get(n)
        if conn is None:
            host, port = self.endpoints[n]
            conn = conns[n] = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return conn

    def _drop(self, n: int) -> None:
        conn = self._local.__dict__.get("c", {}).pop(n, None)
        if conn is not None:
            conn.close()

    def _post(self, n: int, path: str, data: bytes) -> dict[str, Any]:
        conn = self._connection(n)
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._drop(n)
            raise _Retry(str(e) or type(e).__name__) from None
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = {}
        if resp.status == 200 and isinstance(doc, dict):
            return doc
        message = str(doc.get("message") or payload[:200].decode(errors="replace"))
        if resp.status >= 500 or doc.get("code") in _RETRY_CODES:
            raise _Retry(message)
        hint = next((h for k, h in _HINTS.items() if k in message), "")
        raise StoreError(f"etcd {self._name(n)}{path}: {message}" + (f" ({hint})" if hint else ""))

    def wait_change(self, key: bytes, start_revision: int, timeout: float) -> None:
        """Block until key changes at or after etcd revision start_revision, or up to
        timeout seconds; any failure just returns (the caller reads what is there)."""
        host, port = self.endpoints[self._preferred]
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        request = {"create_request": {"key": _b64(key), "start_revision": start_revision}}
        try:
            conn.request("POST", "/v3/watch", body=json.dumps(request).encode())
            resp = conn.getresponse()
            while resp.status == 200:
                line = resp.readline()
                if not line:
                    return
                result = json.loads(line).get("result", {})
                if result.get("events") or result.get("canceled"):
                    return
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(min(timeout, 0.05))  # a member that is gone refuses at once
        finally:
            conn.close()


def _encode(events: list[Event]) -> bytes:
    return json.dumps(
        [[ev.rev, ev.type, _key_text(ev.key), _b64(ev.obj.SerializeToString())] for ev in events]
    ).encode()


def _decode(data: bytes) -> list[Event]:
    out = []
    for rev, typ, key, obj_b64 in json.loads(data):
        obj = pb.Object()
        obj.ParseFromString(_unb64(obj_b64))
        out.append(Event(int(rev), int(typ), _key_from_text(key), obj))
    return out


def _put(key: bytes, value: bytes) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value)}}


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with prefix (which ends in '/')."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdStore:
    """The registry's Store (and SharedStore) on etcd; see the module's docstring."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        prefix: str = DEFAULT_PREFIX,
        history: int = 100_000,
        timeout: float = 2.0,
        patience: float = 8.0,
    ) -> None:
        self.gateway = Gateway(endpoints, timeout=timeout, patience=patience)
        self.history = history
        root = prefix.rstrip("/").encode()
        self._revision_key = root + b"/revision"
        self._compacted_key = root + b"/compacted"
        self._objects = root + b"/objects/"
        self._events = root + b"/events/"
        self._compacted = 0

    def _event_key(self, rev: int) -> bytes:
        return self._events + b"%020d" % rev

    def _object_key(self, ev: Event) -> bytes:
        return self._objects + _key_text(ev.key).encode()

    # ------------------------------------------------------------ reads

    def _range(
        self, key: bytes, end: bytes | None = None, revision: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """Every key-value in [key, end) (or key alone), paged; and the etcd revision read at."""
        kvs: list[dict[str, Any]] = []
        start = key
        while True:
            req: dict[str, Any] = {"key": _b64(start), "revision": revision}
            if end is not None:
                req.update(range_end=_b64(end), limit=PAGE)
            doc = self.gateway.call("/v3/kv/range", req)
            revision = int(doc["header"]["revision"])
            page = doc.get("kvs", [])
            kvs.extend(page)
            if not doc.get("more") or not page:
                return kvs, revision
            start = _unb64(page[-1]["key"]) + b"\0"

    @staticmethod
    def _int_value(kvs: list[dict[str, Any]]) -> int:
        return int(_unb64(kvs[0].get("value", ""))) if kvs else 0

    def load(self) -> Snapshot:
        rev_kvs, at = self._range(self._revision_key)
        compacted_kvs, _ = self._range(self._compacted_key, revision=at)
        object_kvs, _ = self._range(self._objects, _prefix_end(self._objects), revision=at)
        event_kvs, _ = self._range(self._events, _prefix_end(self._events), revision=at)
        objects = []
        for kv in object_kvs:
            obj = pb.Object()
            obj.ParseFromString(_unb64(kv.get("value", "")))
            objects.append((obj, int(message_of(obj).metadata.resource_version or 0)))
        events = [ev for kv in event_kvs for ev in _decode(_unb64(kv.get("value", "")))]
        self._compacted = self._int_value(compacted_kvs)
        return Snapshot(self._int_value(rev_kvs), self._compacted, objects, events)

    def _read_after(self, revision: int) -> tuple[list[Event], int]:
        """The events after revision, and the etcd revision they were read at. Raises
        StoreGap when the store is past revision but its next events are gone."""
        events: list[Event] = []
        start = self._event_key(revision + 1)
        while True:
            doc = self.gateway.call(
                "/v3/kv/txn",
                {
                    "success": [
                        {
                            "request_range": {
                                "key": _b64(start),
                                "range_end": _b64(_prefix_end(self._events)),
                                "limit": PAGE,
                            }
                        },
                        {"request_range": {"key": _b64(self._revision_key)}},
                    ]
                },
            )
            batches, current = (r["response_range"] for r in doc["responses"])
            for kv in batches.get("kvs", []):
                events.extend(_decode(_unb64(kv["value"])))
            if not batches.get("more"):
                break
            start = _unb64(batches["kvs"][-1]["key"]) + b"\0"
        latest = self._int_value(current.get("kvs", []))
        if latest > revision and (not events or events[0].rev != revision + 1):
            raise StoreGap(
                f"etcd: the events after revision {revision} are compacted "
                f"(the store is at {latest})"
            )
        return events, int(doc["header"]["revision"])

    def events_after(self, revision: int) -> list[Event]:
        return self._read_after(revision)[0]

    def wait_events(self, revision: int, timeout: float) -> list[Event]:
        events, at = self._read_after(revision)
        if events:
            return events
        self.gateway.wait_change(self._revision_key, at + 1, timeout)
        return self._read_after(revision)[0]

    # ------------------------------------------------------------ writes

    def commit(self, events: list[Event]) -> None:
        if not events:
            return
        expected, last = events[0].rev - 1, events[-1].rev
        if expected == 0:
            compare = {"target": "CREATE", "result": "EQUAL", "create_revision": 0}
        else:
            compare = {"target": "VALUE", "result": "EQUAL", "value": _b64(str(expected))}
        compare["key"] = _b64(self._revision_key)
        latest = {ev.key: ev for ev in events}  # a txn may put each key once
        ops: list[dict[str, Any]] = []
        for ev in latest.values():
            if ev.type == DELETED:
                ops.append({"request_delete_range": {"key": _b64(self._object_key(ev))}})
            else:
                ops.append(_put(self._object_key(ev), ev.obj.SerializeToString()))
        ops.append(_put(self._event_key(events[0].rev), _encode(events)))
        ops.append(_put(self._revision_key, str(last).encode()))
        floor = last - self.history
        compact = floor > 0 and floor > self._compacted + self.history // 10
        if compact:
            # Whole transactions that start at or below floor go.
            end = self._event_key(floor + 1)
            ops.append(
                {"request_delete_range": {"key": _b64(self._events), "range_end": _b64(end)}}
            )
            ops.append(_put(self._compacted_key, str(floor).encode()))
        doc = self.gateway.call("/v3/kv/txn", {"compare": [compare], "success": ops})
        if not doc.get("succeeded"):
            raise StoreConflict(
                f"etcd: the store is past revision {expected}: another registry wrote first"
            )
        if compact:
            self._compacted = floor

    def close(self) -> None:
        """Nothing to release: connections close with their threads."""
