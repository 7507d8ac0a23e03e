"""VagrantTarget's plumbing against stand-ins for `vagrant` and `ssh`: which VM each step
runs on, what it sends, and what it makes of the answers. No VM needed."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.target import TargetError, VagrantTarget

pytestmark = pytest.mark.unit

FAKE_VAGRANT = """\
import sys
if sys.argv[1:] == ["status", "--machine-readable"]:
    for name, state in STATES:
        print(f"1700000000,{name},provider-name,libvirt")
        print(f"1700000000,{name},state,{state}")
elif sys.argv[1] == "ssh-config":
    for name in sys.argv[2:]:
        print(f"Host {name}\\n  HostName 192.168.121.{len(name)}\\n  User vagrant\\n")
else:
    sys.exit(f"fake vagrant: {sys.argv[1:]}")
"""

# Answers by command; each call is logged as (machine, argv, stdin).
FAKE_SSH = """\
import json, shlex, subprocess, sys
args = sys.argv[1:]
machine, argv = args[args.index("--") + 1], shlex.split(args[-1])
stdin = "" if sys.stdin is None or sys.stdin.closed else sys.stdin.read()
with open(LOG, "a") as f:
    f.write(json.dumps([machine, argv, stdin]) + "\\n")
if argv == ["cat", "/etc/ebpflb/registry.env"]:
    print("# written by provision.sh\\nEBPFLB_LISTEN=192.168.56.10:7443")
elif argv == ["cat", "/etc/ebpflb/node.env"]:
    n = machine[-1]
    print(f"EBPFLB_NODE={machine}\\nEBPFLB_NODE_IP=192.168.56.1{n}\\nEBPFLB_POD_CIDR=10.244.{n}.0/24")
elif argv[:3] == ["sudo", "/opt/ebpflb/deploy/pod.sh", "add"]:
    print(f"10.244.{machine[-1]}.7")
elif argv[:4] == ["sudo", "ip", "netns", "exec"]:
    sys.exit(subprocess.run(argv[5:]).returncode)
elif "get" in argv and "-A" in argv:
    print(json.dumps({"kind": "List", "items": [{"metadata": {"name": "node1"}}]}))
elif "get" in argv:
    print(json.dumps({"kind": "Service", "spec": {"clusterIP": "10.96.0.9"}}))
"""


class Fakes:
    def __init__(self, tmp_path: Path, states: list[tuple[str, str]]) -> None:
        self.log = tmp_path / "ssh.log"
        self.vagrant = self._script(tmp_path / "vagrant", f"STATES = {states!r}\n" + FAKE_VAGRANT)
        self.ssh = self._script(tmp_path / "ssh", f"LOG = {str(self.log)!r}\n" + FAKE_SSH)

    @staticmethod
    def _script(path: Path, body: str) -> str:
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
        return str(path)

    def calls(self) -> list[tuple[str, list[str], str]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            machine, argv, stdin = json.loads(line)
            out.append((str(machine), [str(a) for a in argv], str(stdin)))
        return out

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)

    def target(self, tmp_path: Path) -> VagrantTarget:
        return VagrantTarget(project=tmp_path, vagrant=self.vagrant, ssh=self.ssh)


RUNNING = [("control", "running"), ("node1", "running"), ("node2", "running")]
CLI = ["/opt/ebpflb/.venv/bin/ebpflb", "--registry", "192.168.56.10:7443"]


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path, RUNNING + [("node3", "not_created")])


@pytest.fixture
def target(fakes: Fakes, tmp_path: Path) -> Iterator[VagrantTarget]:
    t = fakes.target(tmp_path)
    fakes.clear()
    try:
        yield t
    finally:
        t.close()  # removes its temp dir (and, through the fakes, what the test applied)


def test_nodes_come_from_the_running_node_vms_env_files(fakes: Fakes, tmp_path: Path) -> None:
    t = fakes.target(tmp_path)
    assert [(n.name, n.ip) for n in t.nodes] == [
        ("node1", "192.168.56.11"),
        ("node2", "192.168.56.12"),
    ]
    assert t.registry == "192.168.56.10:7443"
    assert {m for m, _, _ in fakes.calls()} == {"control", "node1", "node2"}
    t.close()


def test_without_a_running_control_vm_it_says_to_vagrant_up(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path, [("control", "poweroff"), ("node1", "running")])
    with pytest.raises(TargetError, match="vagrant up"):
        fakes.target(tmp_path)


def test_a_backend_pod_is_made_on_its_node_and_applied_on_control(
    target: VagrantTarget, fakes: Fakes
) -> None:
    assert target.add_backend_pod("node2", "web", {"app": "web"}, 8080) == "10.244.2.7"
    (make, apply) = fakes.calls()
    assert make == ("node2", ["sudo", "/opt/ebpflb/deploy/pod.sh", "add", "web", "8080"], "")
    assert apply[:2] == ("control", [*CLI, "apply", "-f", "-"])
    (pod,) = json.loads(apply[2])["items"]
    assert pod["kind"] == "Pod"
    assert pod["spec"]["nodeName"] == "node2"
    assert pod["status"]["podIP"] == "10.244.2.7"
    assert pod["metadata"]["labels"] == {"app": "web"}
    assert pod["spec"]["containers"][0]["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]


def test_commands_run_in_the_pod_on_its_node_with_exit_code_and_output(
    target: VagrantTarget, fakes: Fakes
) -> None:
    target.add_client_pod("node1", "client")
    done = target.run_in_pod("client", ["sh", "-c", "echo 'out put'; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "out put\n", "err\n")
    machine, argv, _ = fakes.calls()[-1]
    assert machine == "node1"
    assert argv[:5] == ["sudo", "ip", "netns", "exec", "client"]
    assert target.run_external(["true"]).returncode == 0
    assert fakes.calls()[-1][0] == "control"


def test_objects_go_through_the_cli_on_control(target: VagrantTarget, fakes: Fakes) -> None:
    assert target.get("Service", "web")["spec"]["clusterIP"] == "10.96.0.9"
    assert [n["metadata"]["name"] for n in target.list("nodes")] == ["node1"]
    target.delete("svc", "web")
    target.delete("po", "web")
    argvs = [argv for _, argv, _ in fakes.calls()]
    assert argvs == [
        [*CLI, "get", "Service", "web", "-o", "json"],
        [*CLI, "get", "nodes", "-A", "-o", "json"],
        [*CLI, "delete", "Service", "web", "--ignore-not-found"],
        [*CLI, "delete", "Pod", "web", "--ignore-not-found", "--grace-period", "0"],
    ]


def test_close_removes_what_the_session_made_newest_first(
    target: VagrantTarget, fakes: Fakes
) -> None:
    target.add_backend_pod("node1", "a", {"app": "x"}, 80)
    target.add_client_pod("node2", "b")
    svc: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    target.apply(svc)
    fakes.clear()
    target.close()
    steps = [(m, shlex.join(argv)) for m, argv, _ in fakes.calls()]
    assert steps == [
        (
            "control",
            shlex.join([*CLI, "delete", "Pod", "b", "--ignore-not-found", "--grace-period", "0"]),
        ),
        ("node2", "sudo /opt/ebpflb/deploy/pod.sh del b"),
        (
            "control",
            shlex.join([*CLI, "delete", "Pod", "a", "--ignore-not-found", "--grace-period", "0"]),
        ),
        ("node1", "sudo /opt/ebpflb/deploy/pod.sh del a"),
        ("control", shlex.join([*CLI, "delete", "Service", "s", "--ignore-not-found"])),
    ]
