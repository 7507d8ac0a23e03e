"""The systemd units in deploy/systemd/: what they promise, and flags the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ebpflb.cli import parser
from tests.vm.target import REPO

pytestmark = pytest.mark.unit

UNITS = REPO / "deploy" / "systemd"
EBPFLB = "/opt/ebpflb/.venv/bin/ebpflb"

# What deploy/provision.sh writes into the EnvironmentFiles on the VMs.
EXAMPLE_ENV = {
    "EBPFLB_LISTEN": "192.168.56.10:7443",
    "EBPFLB_STORE": "sqlite:///var/lib/ebpflb/registry.db",
    "EBPFLB_REGISTRY": "192.168.56.10:7443",
    "EBPFLB_NODE": "node1",
    "EBPFLB_NODE_IP": "192.168.56.11",
    "EBPFLB_POD_CIDR": "10.244.1.0/24",
    "EBPFLB_EXTERNAL_IFACE": "eth1",
}


def settings(unit: str) -> dict[str, list[str]]:
    """Key -> every value set for it (comments, sections and continuations aside)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def exec_argv(unit: str) -> list[str]:
    """ExecStart as systemd would run it with EXAMPLE_ENV: ${X} is one word, $X splits
    (and is nothing here: the EXTRA_ARGS variables default to empty)."""
    (line,) = settings(unit)["ExecStart"]
    line = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(EXAMPLE_ENV[m.group(1)]), line)
    line = re.sub(r"\$(\w+)", "", line)
    return shlex.split(line)


def unknown_flags(argv: list[str]) -> list[str]:
    """Arguments `ebpflb` would refuse."""
    _, extra = parser().parse_known_args(argv)
    return list(extra)


@pytest.mark.parametrize(
    ("unit", "command"),
    [("ebpflb-registry.service", "registry"), ("ebpflb-agent.service", "agent")],
)
def test_the_unit_runs_the_venvs_ebpflb_with_flags_it_accepts(unit: str, command: str) -> None:
    argv = exec_argv(unit)
    assert argv[0] == EBPFLB
    assert argv[1] == command
    assert unknown_flags(argv[1:]) == []


@pytest.mark.parametrize("unit", ["ebpflb-registry.service", "ebpflb-agent.service"])
def test_daemons_restart_on_failure_and_stop_on_sigterm(unit: str) -> None:
    s = settings(unit)
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["StateDirectory"] == ["ebpflb"]  # /var/lib/ebpflb


def test_the_agent_leaves_the_datapath_in_place_when_it_stops() -> None:
    """No --cleanup: Services keep working while the agent restarts (maps stay pinned)."""
    argv = exec_argv("ebpflb-agent.service")
    assert "--cleanup" not in argv
    args = parser().parse_known_args(argv[1:])[0]
    assert args.cleanup is False


def test_the_agent_has_the_bpffs_before_it_starts() -> None:
    (pre,) = settings("ebpflb-agent.service")["ExecStartPre"]
    assert "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf" in pre


def test_the_agent_starts_after_the_pod_network() -> None:
    s = settings("ebpflb-agent.service")
    assert "ebpflb-pod-network.service" in s["After"][0].split()
    assert settings("ebpflb-pod-network.service")["Before"] == ["ebpflb-agent.service"]


def test_every_unit_is_installed_by_provisioning() -> None:
    script = (REPO / "deploy" / "provision.sh").read_text()
    assert "deploy/systemd/*.service" in script
    for unit in sorted(p.name for p in UNITS.glob("*.service")):
        assert unit in script, f"provision.sh never enables {unit}"


def test_scripts_the_units_and_vagrantfile_name_are_executable() -> None:
    for script in ("provision.sh", "pod-network.sh", "pod.sh"):
        path: Path = REPO / "deploy" / script
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
