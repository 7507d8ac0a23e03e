"""deploy/pod-network.sh and deploy/pod.sh on a stand-in VM node: a private mount and
network namespace here, with Debian's CNI plugins and nginx, so they are tested without VMs."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.vm.target import REPO

pytestmark = pytest.mark.e2e

DEPLOY = REPO / "deploy"
NEEDED = ("unshare", "nsenter", "ip", "curl", "python3", "/usr/sbin/nginx", "/usr/lib/cni/bridge")


class FakeNode:
    """A process in new mount and network namespaces: /run, /sys and /etc/sysctl.d of
    its own, an eth1 holding 192.168.56.11/24, and the CNI config in `conf_dir`."""

    def __init__(self, conf_dir: Path) -> None:
        self.conf_dir = conf_dir
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_unshared()
        self.sh(
            "mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /etc/sysctl.d && "
            "mount -t sysfs sysfs /sys && ip link set lo up && "
            "ip link add eth1 type veth peer name eth1p && ip link set eth1p up && "
            "ip addr add 192.168.56.11/24 dev eth1 && ip link set eth1 up"
        )

    def _wait_unshared(self, timeout: float = 10.0) -> None:
        """Until the process has its own namespaces: entering it before would mean
        mounting over this machine's /run."""
        proc = Path(f"/proc/{self.proc.pid}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                own = all(
                    os.readlink(proc / "ns" / ns) != os.readlink(f"/proc/self/ns/{ns}")
                    for ns in ("mnt", "net")
                )
                if own and (proc / "comm").read_text().strip() == "sleep":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("unshare did not make the stand-in node's namespaces")
            time.sleep(0.01)

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
        base = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_CONF_DIR": str(self.conf_dir),
            "EBPFLB_CNI_CONFLIST": str(self.conf_dir / "10-ebpflb.conflist"),
            "EBPFLB_ATTACH_TIMEOUT": "0",  # no agent here, whatever this machine runs
        }
        done = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "-n", "--", *argv],
            capture_output=True,
            text=True,
            env={**base, **(env or {})},
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def sh(self, script: str) -> str:
        return self.run(["sh", "-c", script])

    def close(self) -> None:
        # Stop whatever a failed test left in the pods, then the namespaces go with sleep.
        pods = self.sh("ls /run/netns 2>/dev/null || true").split()
        for pod in pods:
            self.run([str(DEPLOY / "pod.sh"), "del", pod])
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[FakeNode]:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, CNI plugins)")
    for tool in NEEDED:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (make setup installs it)")
    n = FakeNode(tmp_path / "cni")
    try:
        yield n
    finally:
        n.close()


POD_ENV = {"EBPFLB_POD_CIDR": "10.244.1.9/24", "EBPFLB_POD_ROUTES": "10.244.2.0/24=192.168.56.12"}


def test_pod_network_writes_the_bridge_config_and_routes_idempotently(node: FakeNode) -> None:
    first = node.run([str(DEPLOY / "pod-network.sh")], POD_ENV)
    assert "wrote" in first
    conf = json.loads((node.conf_dir / "10-ebpflb.conflist").read_text())
    (bridge,) = conf["plugins"]
    assert (conf["cniVersion"], conf["name"]) == ("1.0.0", "ebpflb")
    assert (bridge["type"], bridge["bridge"], bridge["isGateway"]) == ("bridge", "cni0", True)
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}]]
    routes = node.run(["ip", "-j", "route", "show", "10.244.2.0/24"])
    assert json.loads(routes)[0]["gateway"] == "192.168.56.12"
    assert node.run(["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"
    second = node.run([str(DEPLOY / "pod-network.sh")], POD_ENV)
    assert "wrote" not in second and "unchanged" in second


def test_pods_get_addresses_serve_their_name_and_leave_nothing(node: FakeNode) -> None:
    pod_sh = str(DEPLOY / "pod.sh")
    node.run([str(DEPLOY / "pod-network.sh")], POD_ENV)
    web = node.run([pod_sh, "add", "web", "8080"]).strip()
    client = node.run([pod_sh, "add", "client", "0"]).strip()
    for ip in (web, client):
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.1.0/24")
    assert node.run([pod_sh, "ip", "web"]).strip() == web
    body = node.run(["ip", "netns", "exec", "client", "curl", "-sS", f"http://{web}:8080/"])
    assert body == "web\n"
    listed = {line.split()[0]: line.split()[1] for line in node.run([pod_sh, "list"]).splitlines()}
    assert listed == {"web": web, "client": client}

    node.run([pod_sh, "del", "web"])
    node.run([pod_sh, "del", "web"])  # idempotent
    node.run([pod_sh, "del", "client"])
    assert node.run([pod_sh, "list"]) == ""
    assert node.sh("ls -A /run/netns") == ""
    assert "veth" not in node.run(["ip", "-o", "link"])
    # host-local got both addresses back: no lease is left, only its bookkeeping.
    assert set(node.sh("ls /run/cni/ebpflb/ebpflb").split()) == {"last_reserved_ip.0", "lock"}
