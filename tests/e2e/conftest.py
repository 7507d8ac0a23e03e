"""Fixtures for the e2e tier: namespace clusters that are always torn down and checked clean."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ebpflb.cluster import Cluster, cleanup_stale, leftovers, new_prefix, stale_prefixes

REQUIRED = ("ip", "curl", "/usr/sbin/nginx", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local")


def missing_requirement() -> str | None:
    """Why the e2e tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces, CNI plugins)"
    for tool in REQUIRED:
        if shutil.which(tool) is None:
            return f"e2e tests need {tool} (make setup installs it)"
    return None


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_clusters() -> None:
    """Remove what crashed earlier runs left (only clusters whose owner process is gone)."""
    if missing_requirement() is None:
        for prefix in stale_prefixes():
            cleanup_stale(prefix)


def _close_checked(clusters: list[Cluster]) -> None:
    problems = []
    for cluster in clusters:
        try:
            cluster.close()
        except Exception as e:  # still check and sweep what is left
            problems.append(f"{cluster.prefix}: close: {e}")
        left = leftovers(cluster.prefix)
        if left:
            cleanup_stale(cluster.prefix)
            problems.append(f"{cluster.prefix}: close() left {left}")
    if problems:
        pytest.fail("; ".join(problems))


ClusterFactory = Callable[..., Cluster]


def _cluster_factory() -> Iterator[ClusterFactory]:
    """Yield a maker of clusters; afterwards each is closed and must leave nothing behind."""
    if reason := missing_requirement():
        pytest.skip(reason)
    clusters: list[Cluster] = []

    def make(nodes: int = 1, **kw: Any) -> Cluster:
        cluster = Cluster(nodes, **kw)
        clusters.append(cluster)
        return cluster

    yield make
    _close_checked(clusters)


@pytest.fixture
def make_cluster() -> Iterator[ClusterFactory]:
    """Make clusters in a test; each is closed after it and must leave nothing behind."""
    yield from _cluster_factory()


@pytest.fixture(scope="module")
def make_module_cluster() -> Iterator[ClusterFactory]:
    """Like make_cluster, shared by a module's tests (cheaper: nginx starts once)."""
    yield from _cluster_factory()


CHILD = """
import sys, time
from ebpflb.cluster import Cluster
c = Cluster(1, prefix=sys.argv[1], cgroups=sys.argv[2:] == ["--cgroups"])
pod = c.add_pod(0, "web")
c.start_http_server(pod, 8080)
print(c.prefix, flush=True)
while True:
    time.sleep(3600)
"""

ChildCluster = tuple[subprocess.Popen[str], str]


@contextlib.contextmanager
def child_cluster_process(cgroups: bool = False) -> Iterator[ChildCluster]:
    """A separate process that builds a one-node cluster with a web pod, prints its prefix
    and waits to be killed; afterwards whatever it left is swept."""
    prefix = new_prefix()  # chosen here, so the finalizer knows what to sweep in any case
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, prefix, *(["--cgroups"] if cgroups else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        if not ready or proc.stdout.readline().strip() != prefix:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"child cluster did not start: {err}")
        yield proc, prefix
    finally:
        if proc.poll() is None:
            proc.terminate()  # the child closes its cluster on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=30)
        cleanup_stale(prefix)


@pytest.fixture
def child_cluster() -> Iterator[ChildCluster]:
    """See child_cluster_process."""
    if reason := missing_requirement():
        pytest.skip(reason)
    with child_cluster_process() as child:
        yield child
