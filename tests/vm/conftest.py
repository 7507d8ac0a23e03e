"""The multi-node suite's cluster: a namespace cluster or the Vagrant VMs, by $EBPFLB_TARGET."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import missing_requirement
from tests.vm.target import ClusterTarget, make_target, selected_target


@pytest.fixture(scope="module")
def cluster_target() -> Iterator[ClusterTarget]:
    """The target $EBPFLB_TARGET names (default netns), for one module; closed after it.

    A namespace cluster is skipped where it cannot run (not root, tools missing);
    asking for the VMs where vagrant or ssh is missing is an error, not a skip."""
    if selected_target() == "netns":
        if reason := missing_requirement():
            pytest.skip(reason)
    else:
        for tool in ("vagrant", "ssh"):
            if shutil.which(tool) is None:
                pytest.fail(f"EBPFLB_TARGET=vagrant needs `{tool}` on this host")
    target = make_target()
    try:
        yield target
    finally:
        target.close()
