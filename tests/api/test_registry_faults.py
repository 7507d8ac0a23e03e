"""Registry faults: kill -9 the registry (SQLite store) in the middle of a stream of Applies
from several writers, several times, restarting it on the same store each time. Every Apply
that was acknowledged must be there afterwards with the ClusterIP it was acknowledged with;
ClusterIPs stay unique across the crashes."""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from ebpflb.client import RegistryClient, RegistryError
from tests.api.test_registry_api import svc
from tests.conftest import RegistryProcess

pytestmark = pytest.mark.api

SERVICES = 500
WRITERS = 5
KILLS = 4
# What a writer gets from a registry that was killed under it or is not up yet.
NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Writers:
    """WRITERS threads applying SERVICES Services between them, one per Apply, each retried
    (on a new channel) until acknowledged while the registry is down."""

    address: str
    attempted: int = 0
    unacknowledged: int = 0  # attempts that got no answer (the registry was killed or down)
    acknowledged: dict[str, str] = field(default_factory=dict)  # name -> ClusterIP
    errors: list[str] = field(default_factory=list)  # answers that are not "unavailable"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _write(self, w: int) -> None:
        client = RegistryClient(self.address, timeout=10)
        try:
            for i in range(w, SERVICES, WRITERS):
                name = f"w{w}-s{i}"
                deadline = time.monotonic() + 120
                while True:
                    with self._lock:
                        self.attempted += 1
                    try:
                        resp = client.apply([svc(name)])
                    except RegistryError as e:
                        if e.code not in NO_ANSWER:
                            with self._lock:
                                self.errors.append(f"{name}: {e}")
                            return
                        with self._lock:
                            self.unacknowledged += 1
                        if time.monotonic() > deadline:
                            with self._lock:
                                self.errors.append(f"{name}: never acknowledged: {e}")
                            return
                        client.close()  # a fresh channel: no reconnect backoff to wait out
                        time.sleep(0.05)
                        client = RegistryClient(self.address, timeout=10)
                        continue
                    with self._lock:
                        self.acknowledged[name] = resp.objects[0].service.spec.cluster_ip
                    break
        finally:
            client.close()

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._write, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        return threads


def test_acknowledged_applies_survive_kill_9_under_concurrent_writers(
    registry_process: RegistryProcess,
) -> None:
    writers = Writers(registry_process.address)
    threads = writers.start()
    rng = random.Random(6)
    kills = 0
    try:
        for _ in range(KILLS):
            # Each kill lands in the middle of the stream: after some more acknowledgements.
            target = len(writers.acknowledged) + rng.randrange(20, SERVICES // (KILLS + 1))
            deadline = time.monotonic() + 60
            while len(writers.acknowledged) < target and time.monotonic() < deadline:
                time.sleep(0.01)
            if len(writers.acknowledged) >= SERVICES:
                break
            registry_process.kill(signal.SIGKILL)
            kills += 1
            registry_process.start()
    finally:
        for t in threads:
            t.join(timeout=180)
    registry_process.restart()  # and once more after the last acknowledgement
    with RegistryClient(registry_process.address, timeout=30) as client:
        stored = {
            o.service.metadata.name: o.service.spec.cluster_ip
            for o in client.list(kind="Service").items
        }
    found = {n: ip for n, ip in writers.acknowledged.items() if stored.get(n) == ip}
    lost = sorted(set(writers.acknowledged) - set(found))
    print(
        f"\nregistry killed {kills + 1} times (kill -9) under {WRITERS} writers: "
        f"{writers.attempted} Applies attempted, {len(writers.acknowledged)} acknowledged, "
        f"{writers.unacknowledged} unanswered (retried), {len(found)} found after restart "
        f"with their ClusterIP, {len(lost)} lost"
    )
    assert writers.errors == []
    assert kills == KILLS, "the stream ended before every kill"
    assert len(writers.acknowledged) == SERVICES
    assert lost == [], [(n, writers.acknowledged[n], stored.get(n)) for n in lost[:5]]
    ips = [ip for n, ip in stored.items() if n != "kubernetes"]
    assert len(set(ips)) == len(ips), "a ClusterIP given twice"
