"""Pod networking through the standard CNI `bridge` plugin, executed the way the CNI spec says."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpflb.cluster.netns import exec_argv

CNI_PATH = Path("/usr/lib/cni")
"""Debian's containernetworking-plugins."""

CNI_VERSION = "1.0.0"


class CniError(RuntimeError):
    """A CNI plugin failed; carries the spec's error code and message when it gave them."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BridgeNetwork:
    """One node's pod network: the CNI network configuration for the `bridge` plugin."""

    name: str
    """CNI network name; host-local keeps its state in `data_dir/name`."""
    bridge: str
    subnet: str
    gateway: str
    data_dir: Path
    """host-local's dataDir: per cluster, so nothing lands in /var/lib/cni."""
    plugin_dir: Path = CNI_PATH

    def config(self, prev_result: dict[str, Any] | None = None) -> dict[str, Any]:
        """The network configuration handed to the plugin on stdin."""
        conf: dict[str, Any] = {
            "cniVersion": CNI_VERSION,
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            # isGateway puts the gateway address on the bridge; it does NOT give
            # the pod a default route: host-local's `routes` below does that.
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.data_dir),
            },
        }
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf


@dataclass(frozen=True)
class Attachment:
    """What CNI ADD reported for one pod interface."""

    container_id: str
    netns_path: str
    ifname: str
    ip: str
    prefix_len: int
    gateway: str
    mac: str
    host_veth: str
    """The host side of the pod's veth, in the namespace the plugin ran in (the node's)."""
    bridge: str
    result: str = field(repr=False)
    """The plugin's result JSON, kept for DEL's prevResult."""


def _plugin_env(
    command: str, container_id: str, netns_path: str | None, ifname: str, plugin_dir: Path
) -> dict[str, str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_IFNAME": ifname,
        "CNI_PATH": str(plugin_dir),
    }
    if netns_path:
        env["CNI_NETNS"] = netns_path
    return env


def exec_plugin(
    config: dict[str, Any],
    env: dict[str, str],
    *,
    run_in: str,
    cgroup: Path | None = None,
    plugin_dir: Path = CNI_PATH,
    timeout: float = 60.0,
) -> dict[str, Any] | None:
    """Execute the plugin named by config["type"] inside namespace `run_in` (and `cgroup`).

    The bridge plugin makes the bridge and the host side of the veth in the
    namespace it runs in, so it must run inside the node's namespace.
    Returns the parsed result (None when the plugin printed nothing, as DEL does).
    """
    plugin = plugin_dir / str(config["type"])
    argv = [*exec_argv(run_in, cgroup=cgroup), str(plugin)]
    try:
        done = subprocess.run(
            argv,
            input=json.dumps(config),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CniError(f"{plugin} {env['CNI_COMMAND']} timed out after {timeout}s") from e
    what = f"{plugin.name} {env['CNI_COMMAND']} {env['CNI_CONTAINERID']}"
    if done.returncode != 0:
        try:
            err = json.loads(done.stdout)
            msg = f"{what}: code {err.get('code')}: {err.get('msg')} {err.get('details', '')}"
            raise CniError(msg.strip(), err.get("code"))
        except (ValueError, AttributeError):
            raise CniError(f"{what}: exit {done.returncode}: {done.stderr.strip()}") from None
    if not done.stdout.strip():
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def parse_result(
    result: dict[str, Any], *, container_id: str, netns_path: str, ifname: str, bridge: str
) -> Attachment:
    """Pick the pod's address and both veth ends out of an ADD result (CNI 1.0.0 format)."""
    interfaces: list[dict[str, Any]] = result.get("interfaces", [])
    ips: list[dict[str, Any]] = [
        ip for ip in result.get("ips", []) if ipaddress.ip_interface(ip["address"]).version == 4
    ]
    if not ips:
        raise CniError(f"CNI ADD {container_id}: no IPv4 address in result {result}")
    first = ips[0]
    iface = ipaddress.ip_interface(first["address"])
    idx = first.get("interface")
    pod_if = interfaces[idx] if idx is not None and idx < len(interfaces) else {}
    host_side = [i for i in interfaces if not i.get("sandbox") and i.get("name") != bridge]
    if len(host_side) != 1:
        raise CniError(f"CNI ADD {container_id}: cannot tell the host veth in {interfaces}")
    return Attachment(
        container_id=container_id,
        netns_path=netns_path,
        ifname=str(pod_if.get("name", ifname)),
        ip=str(iface.ip),
        prefix_len=iface.network.prefixlen,
        gateway=str(first.get("gateway", "")),
        mac=str(pod_if.get("mac", "")),
        host_veth=str(host_side[0]["name"]),
        bridge=bridge,
        result=json.dumps(result),
    )


def cni_add(
    network: BridgeNetwork,
    *,
    run_in: str,
    cgroup: Path | None = None,
    container_id: str,
    netns_path: str,
    ifname: str = "eth0",
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Attachment:
    """CNI ADD: attach the namespace at `netns_path` to the node's bridge.

    The plugin runs in the node's namespace `run_in` and, if given, its `cgroup`."""
    env = _plugin_env("ADD", container_id, netns_path, ifname, network.plugin_dir)
    env.update(extra_env or {})
    result = exec_plugin(
        network.config(),
        env,
        run_in=run_in,
        cgroup=cgroup,
        plugin_dir=network.plugin_dir,
        timeout=timeout,
    )
    if result is None:
        raise CniError(f"CNI ADD {container_id}: the plugin printed no result")
    return parse_result(
        result,
        container_id=container_id,
        netns_path=netns_path,
        ifname=ifname,
        bridge=network.bridge,
    )


def cni_del(
    network: BridgeNetwork,
    *,
    run_in: str,
    cgroup: Path | None = None,
    container_id: str,
    netns_path: str | None,
    ifname: str = "eth0",
    prev_result: str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> None:
    """CNI DEL: release the address and remove the pod's veth. Idempotent, as the spec asks.

    `netns_path` may be None when the namespace is already gone (the plugin
    then only releases the IPAM state).
    """
    env = _plugin_env("DEL", container_id, netns_path, ifname, network.plugin_dir)
    env.update(extra_env or {})
    prev = json.loads(prev_result) if prev_result else None
    exec_plugin(
        network.config(prev),
        env,
        run_in=run_in,
        cgroup=cgroup,
        plugin_dir=network.plugin_dir,
        timeout=timeout,
    )
