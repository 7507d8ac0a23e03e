"""Fuzzing the registry with random sequences of Apply, Delete, Get, List and Watch, in
process and through a real gRPC server.

Properties, after every step: no exception but RegistryError (in process), no status
but INVALID_ARGUMENT, ALREADY_EXISTS, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE
(through gRPC); a refused or dry-run Apply changes nothing (List and revision as
before); ClusterIPs and nodePorts unique and in range; every Service's EndpointSlices
are what compute_slices gives for the pods it selects; the watch history replays to
what List shows; a restart on the same store shows the same List and revision.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ebpflb import labels
from ebpflb.api.v1 import registry_pb2 as pb
from ebpflb.objects import KINDS, Key, from_manifest, key_of, message_of
from tests.fuzz.common import (
    assert_one_line,
    crashed,
    fuzz_settings,
    manifest_docs,
    manifests_dir,
    tally,
)
from tests.fuzz.registry_fuzz import (
    ALLOWED,
    AVOID_KNOWN_BUGS,
    BOOKMARK,
    HAND_SLICES,
    NODES,
    PODS,
    SERVICES,
    Client,
    InProcess,
    OverGrpc,
    Refused,
    Sandbox,
    Unexpected,
    WatchEvents,
    batches,
    check_invariants,
    is_managed_slice,
    kinds,
    matches,
    namespaces,
    replay,
    resource_versions,
    selector_strings,
    service_with_pods,
    users_objects,
)

USERS = users_objects(manifest_docs()) if manifests_dir().is_dir() else []
GRACE = st.sampled_from([None, 0, -1, 3600, 2**40])


class RegistryMachine(RuleBasedStateMachine):
    """One registry, a random sequence of requests; the checks are in the rules and
    in `consistent`, which runs after every step."""

    target = "registry in process: requests"

    def __init__(self) -> None:
        super().__init__()
        self.sandbox = Sandbox.make()
        self.client: Client = self.make_client()
        self.log: WatchEvents = []  # every event from revision 1 on, read by watching
        self.replayed: dict[Key, pb.Object] = {}
        self.items: list[pb.Object] = []
        self.revision = 0
        tally(self.target).outcomes["sequences"] += 1

    def make_client(self) -> Client:
        return InProcess(self.sandbox.folder)

    def teardown(self) -> None:
        self.client.close()
        self.sandbox.remove()

    # -------------------------------------------------------------- helpers

    def call(self, what: str, fn: Any) -> tuple[Any, Refused | None]:
        t = tally(self.target)
        t.tried += 1
        try:
            result = fn()
            t.outcomes[f"{what} ok"] += 1
            return result, None
        except Refused as e:
            assert e.code in ALLOWED, e
            assert_one_line(e.message)
            t.outcomes[f"{what} refused"] += 1
            return None, e
        except Unexpected as e:
            raise crashed(self.target, e) from e

    def snapshot(self) -> tuple[list[pb.Object], int]:
        result, refused = self.call("List", lambda: self.client.list("", "", ""))
        assert refused is None
        items, rev = result
        return items, rev

    def keys(self, data: st.DataObject) -> Key:
        """A key that exists (most of the time) or one that may not."""
        # Deleting the registry's own EndpointSlices is a known bug: it is not refused
        # and they are not made again.
        present = [key_of(o) for o in self.items if not (AVOID_KNOWN_BUGS and is_managed_slice(o))]
        if present and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(present))
        kind = data.draw(st.sampled_from([*KINDS, "Gadget", "service"]))
        names = {"Service": SERVICES, "Pod": PODS, "Node": NODES}.get(kind, HAND_SLICES)
        return Key(kind, data.draw(namespaces), data.draw(st.sampled_from([*names, "nope"])))

    def stored(self, key: Key) -> pb.Object | None:
        kind = KINDS.get(key.kind)
        if kind is None:
            return None
        ns = (key.namespace or "default") if kind.namespaced else ""
        return {key_of(o): o for o in self.items}.get(Key(key.kind, ns, key.name))

    # -------------------------------------------------------------- requests

    @rule(data=st.data(), dry_run=st.booleans())
    def apply(self, data: st.DataObject, dry_run: bool) -> None:
        self.apply_batch(data.draw(batches(USERS)), dry_run)

    @rule(data=st.data())
    def apply_without_broken_objects(self, data: st.DataObject) -> None:
        """More state to check: objects valid by construction (they may still clash)."""
        self.apply_batch(data.draw(batches(USERS, broken=False)), dry_run=False)

    @rule(data=st.data())
    def apply_service_with_pods(self, data: st.DataObject) -> None:
        self.apply_batch(data.draw(service_with_pods()), dry_run=False)

    def apply_batch(self, batch: list[pb.Object], dry_run: bool) -> None:
        given = [o.SerializeToString() for o in batch]
        before = self.snapshot()
        result, refused = self.call("Apply", lambda: self.client.apply(batch, dry_run))
        after = self.snapshot()
        assert [o.SerializeToString() for o in batch] == given, "Apply changed its argument"
        if refused is not None or dry_run:
            assert after == before, "a refused or dry-run Apply changed something"
            return
        stored, results = result
        assert len(stored) == len(results) == len(batch)
        assert set(results) <= {"created", "configured", "unchanged"}
        if set(results) <= {"unchanged"}:
            assert after[1] == before[1], "an Apply that changed nothing made a revision"
        now = {key_of(o): o for o in after[0]}
        last = {key_of(o): o for o in stored}  # a key applied twice: its last version
        for key, obj in last.items():
            assert now.get(key) == obj, key

    @rule(data=st.data(), grace=GRACE)
    def delete(self, data: st.DataObject, grace: int | None) -> None:
        key = self.keys(data)
        old = self.stored(key)
        result, refused = self.call("Delete", lambda: self.client.delete(key, grace))
        if key.kind not in KINDS:
            assert refused is not None and refused.code == "INVALID_ARGUMENT", refused
            return
        if old is None:
            assert refused is not None and refused.code == "NOT_FOUND", refused
            return
        assert refused is None, refused
        now = self.stored_after(key)
        if key.kind == "Pod" and grace is not None and grace > 0:
            assert now is not None and now.pod.metadata.HasField("deletion_timestamp")
        else:
            assert now is None and result == old

    def stored_after(self, key: Key) -> pb.Object | None:
        self.items, self.revision = self.snapshot()
        return self.stored(key)

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        key = self.keys(data)
        old = self.stored(key)
        result, refused = self.call("Get", lambda: self.client.get(key))
        if key.kind not in KINDS:
            assert refused is not None and refused.code == "INVALID_ARGUMENT", refused
        elif old is None:
            assert refused is not None and refused.code == "NOT_FOUND", refused
        else:
            assert refused is None and result == old

    @rule(kind=kinds, namespace=namespaces, selector=selector_strings)
    def list(self, kind: str, namespace: str, selector: str) -> None:
        result, refused = self.call("List", lambda: self.client.list(kind, namespace, selector))
        sel = self.parsed(kind, selector)
        if sel is None:
            assert refused is not None and refused.code == "INVALID_ARGUMENT", refused
            return
        assert refused is None, refused
        items, rev = result
        assert rev == self.revision
        want = [o for o in self.items if matches(kind, namespace, sel, key_of(o), o)]
        assert items == want

    @staticmethod
    def parsed(kind: str, selector: str) -> labels.Selector | None:
        if kind and kind not in KINDS:
            return None
        try:
            return labels.parse_selector(selector)
        except labels.SelectorError:
            return None

    @rule(rv=resource_versions, kind=kinds, namespace=namespaces, selector=selector_strings)
    def watch(self, rv: str, kind: str, namespace: str, selector: str) -> None:
        sel = self.parsed(kind, selector)
        expected_code: str | None = None
        want: WatchEvents = []
        if sel is None:
            expected_code = "INVALID_ARGUMENT"
        elif rv == "":
            want = [
                (pb.WatchEvent.ADDED, o, int(message_of(o).metadata.resource_version))
                for o in self.items
                if matches(kind, namespace, sel, key_of(o), o)
            ]
            want.append((BOOKMARK, None, self.revision))
        else:
            try:
                since = int(rv)
            except ValueError:
                expected_code = "INVALID_ARGUMENT"
            else:
                if not 0 <= since <= self.revision:
                    expected_code = "OUT_OF_RANGE"
                else:
                    want = [
                        (t, o, r)
                        for t, o, r in self.log
                        if r > since
                        and o is not None
                        and matches(kind, namespace, sel, key_of(o), o)
                    ]
        result, refused = self.call(
            "Watch",
            lambda: self.client.watch(
                rv, kind, namespace, selector, len(want), refusal=expected_code is not None
            ),
        )
        if expected_code is not None:
            assert refused is not None and refused.code == expected_code, (rv, refused)
            return
        assert refused is None, refused
        assert result == want

    # -------------------------------------------------------------- after every step

    @invariant()
    def consistent(self) -> None:
        self.items, self.revision = self.snapshot()
        check_invariants(self.items, self.revision)
        if any(is_managed_slice(o) for o in self.items):
            tally(self.target).outcomes["states with managed EndpointSlices"] += 1
        # The watch history, read on from where the last step left it, replays to List.
        done = self.log[-1][2] if self.log else 0
        if self.revision > done:
            count = self.revision - done  # one event per revision
            events, refused = self.call(
                "Watch", lambda: self.client.watch(str(done), "", "", "", count)
            )
            assert refused is None, refused
            assert [r for _, _, r in events] == list(range(done + 1, self.revision + 1))
            replay(self.replayed, events)
            self.log += events
        assert self.replayed == {key_of(o): o for o in self.items}


class RestartingMachine(RegistryMachine):
    """In process, also closing and reopening the registry on the same store."""

    restarted_at = 0

    @precondition(lambda self: self.revision > self.restarted_at)  # something new to keep
    @rule()
    def restart(self) -> None:
        assert isinstance(self.client, InProcess)
        self.restarted_at = self.revision
        before = self.snapshot()
        tally(self.target).outcomes["restarts"] += 1
        try:
            self.client.reopen()
        except Exception as e:
            raise crashed(self.target, e) from e
        assert self.snapshot() == before, "a restart changed the List or the revision"
        events, refused = self.call(
            "Watch", lambda: self.client.watch("0", "", "", "", self.revision)
        )
        assert refused is None and events == self.log, "a restart changed the history"


class GrpcMachine(RegistryMachine):
    """The same sequences through make_server on a unix socket."""

    target = "registry over gRPC: requests"

    def make_client(self) -> Client:
        return OverGrpc(self.sandbox.folder)


TestRegistryInProcess = RestartingMachine.TestCase
TestRegistryInProcess.settings = fuzz_settings(20, steps=25)
TestRegistryInProcess = pytest.mark.unit(TestRegistryInProcess)

TestRegistryOverGrpc = GrpcMachine.TestCase
TestRegistryOverGrpc.settings = fuzz_settings(6, steps=20)
TestRegistryOverGrpc = pytest.mark.api(TestRegistryOverGrpc)


# ------------------------------------------------------------------ bytes that are no request

METHODS: dict[str, tuple[type[Message], bool]] = {
    "Apply": (pb.ApplyRequest, False),
    "Delete": (pb.DeleteRequest, False),
    "Get": (pb.GetRequest, False),
    "List": (pb.ListRequest, False),
    "Watch": (pb.WatchRequest, True),
}


def _raw(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def server_address() -> Any:
    sandbox = Sandbox.make()
    client = OverGrpc(sandbox.folder)
    yield f"unix://{sandbox.folder}/registry.sock"
    client.close()
    sandbox.remove()


@pytest.mark.api
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=64))
@fuzz_settings(100)
def test_any_bytes_sent_as_a_request(server_address: str, method: str, payload: bytes) -> None:
    """Bytes that parse as the request are answered with an allowed status; bytes that
    do not are gRPC's own INTERNAL "Exception deserializing request!" (see the report)."""
    target = "registry over gRPC: raw request bytes"
    t = tally(target)
    t.tried += 1
    message, streaming = METHODS[method]
    try:
        message.FromString(payload)
        parses = True
    except Exception:
        parses = False
    with grpc.insecure_channel(server_address) as ch:
        path = f"/ebpflb.v1.Registry/{method}"
        try:
            if streaming:
                stream = ch.unary_stream(path, _raw, _raw)(payload, timeout=0.5)
                for _ in stream:
                    break
                stream.cancel()
            else:
                ch.unary_unary(path, _raw, _raw)(payload, timeout=10)
            t.outcomes["answered"] += 1
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and streaming:
                t.outcomes["watching"] += 1
                return
            if not parses:
                assert code == grpc.StatusCode.INTERNAL, code
                assert e.details() == "Exception deserializing request!"
                t.outcomes["not a request: INTERNAL"] += 1
                return
            if code.name not in ALLOWED:
                raise crashed(target, e) from e
            t.outcomes[f"refused {code.name}"] += 1


# ------------------------------------------------------------------ restart


@pytest.mark.unit
def test_a_restart_on_the_same_store_shows_the_same_list_revision_and_history() -> None:
    """Close the registry and open it again on its SQLite file: List, revision and the
    watch history are as they were (the stateful test does this at random points too)."""
    sandbox = Sandbox.make()
    client = InProcess(sandbox.folder, service_cidr="10.96.0.0/12")  # room for the users'
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "nginx", "labels": {"app.kubernetes.io/name": "proxy"}},
            "spec": {
                "containers": [
                    {"name": "c", "ports": [{"name": "http-web-svc", "containerPort": 80}]}
                ]
            },
            "status": {"podIP": "10.244.0.5"},
        }
        client.apply([*USERS, from_manifest(pod)], dry_run=False)
        pod["metadata"]["name"] = "nginx2"  # type: ignore[index]
        client.apply([from_manifest(pod)], dry_run=False)
        client.delete(Key("Pod", "", "nginx2"), grace=3600)  # terminating, kept
        client.delete(Key("Service", "", "my-service"), grace=None)
        before = client.list("", "", "")
        history = client.watch("0", "", "", "", before[1])
        assert before[1] > 0 and len(history) == before[1]
        client.reopen()
        assert client.list("", "", "") == before
        assert client.watch("0", "", "", "", before[1]) == history
        check_invariants(*before, service_cidr=client.service_cidr)
    finally:
        client.close()
        sandbox.remove()
