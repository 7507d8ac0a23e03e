"""Fixtures for the e2e tier: namespace clusters that are always torn down and checked clean."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ebpflb.cluster import Cluster, cleanup_stale, leftovers, stale_prefixes

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
