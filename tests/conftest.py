"""Fixtures shared by every tier: a real registry process on a unix socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
EBPFLB = [sys.executable, "-m", "ebpflb"]


def manifests_dir() -> Path:
    """The users' manifests: $EBPFLB_MANIFESTS, or ../shared/manifests beside the repo."""
    env = os.environ.get("EBPFLB_MANIFESTS")
    return Path(env) if env else REPO.parent / "shared" / "manifests"


@dataclass
class RegistryProcess:
    """`ebpflb registry` running as a child process."""

    address: str
    store: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self) -> None:
        assert self.log is not None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*EBPFLB, "registry", "--listen", self.address, "--store", self.store, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_serving(self.address, self.proc)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


def wait_serving(
    address: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60
) -> None:
    """Block until the registry's health service says SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"registry at {address} not serving after {timeout}s")
        time.sleep(0.05)


def _registry(tmp_path: Path, args: list[str]) -> Iterator[RegistryProcess]:
    r = RegistryProcess(
        address=f"unix://{tmp_path}/registry.sock",
        store=f"sqlite://{tmp_path}/registry.db",
        args=args,
        log=tmp_path / "registry.log",
    )
    r.start()
    try:
        yield r
    finally:
        r.kill(signal.SIGTERM)


@pytest.fixture
def registry_process(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A fresh registry (own socket, own SQLite store) for one test."""
    yield from _registry(tmp_path, [])


@pytest.fixture
def registry_addr(registry_process: RegistryProcess) -> str:
    """The address (unix:///...) of a fresh registry for one test."""
    return registry_process.address
