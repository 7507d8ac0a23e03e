#!/usr/bin/env bash
# Provision a VM of the Vagrant cluster (see the Vagrantfile and docs/vagrant.md):
#
#   provision.sh control   the registry, ebpflb-registry.service, on $EBPFLB_LISTEN
#   provision.sh node      the pod network and ebpflb-agent.service, from
#                          EBPFLB_REGISTRY, EBPFLB_NODE, EBPFLB_NODE_IP,
#                          EBPFLB_POD_CIDR, EBPFLB_POD_ROUTES (and optionally
#                          EBPFLB_EXTERNAL_IFACE: default, the interface that
#                          holds EBPFLB_NODE_IP)
#
# Runs as root in the VM, with the repo at /opt/ebpflb. Everything is written
# from the environment, so the same script serves every node, and a rerun
# (`vagrant provision`) applies new settings and code and restarts the units.
set -euo pipefail

TOP=${EBPFLB_TOP:-/opt/ebpflb}
ETC=/etc/ebpflb
UNITS=/etc/systemd/system
ROLE=${1:-}

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: %s\n' "$*" >&2; exit 1; }
need() { [[ -n ${!1:-} ]] || die "set $1 (the Vagrantfile passes it)"; }

[[ $(id -u) -eq 0 ]] || die "run as root"
[[ $ROLE == control || $ROLE == node ]] || die "usage: provision.sh control|node"
[[ -f $TOP/Makefile ]] || die "no repo at $TOP (the Vagrantfile rsyncs it there)"

# ------------------------------------------------------------------ make setup

export DEBIAN_FRONTEND=noninteractive
# The box has no make; setup.sh needs sudo only when not root.
if ! command -v make >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends make
fi
# Headers that match the box's kernel, when Debian still has them; otherwise
# `make setup` links the newest linux-headers-amd64 (`vagrant box update`
# brings a box whose kernel matches them).
headers=linux-headers-$(uname -r)
if ! dpkg-query -W -f='${Status}' "$headers" 2>/dev/null | grep -q 'install ok installed'; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "$headers" ||
    say "$headers is not in the archive any more; make setup links the newest headers"
fi
make -C "$TOP" setup
ln -sfn "$TOP/.venv/bin/ebpflb" /usr/local/bin/ebpflb
ln -sfn "$TOP/deploy/pod.sh" /usr/local/sbin/ebpflb-pod

# ------------------------------------------------------------------ units

install -d -m 0755 "$ETC"
install -m 0644 "$TOP"/deploy/systemd/*.service "$UNITS/"
systemctl daemon-reload

# KEY=VALUE lines for an EnvironmentFile (values here never need quoting).
env_file() { # PATH NAME...
  local path=$1
  shift
  {
    echo "# Written by $TOP/deploy/provision.sh; \`vagrant provision\` rewrites it."
    for name in "$@"; do printf '%s=%s\n' "$name" "${!name:-}"; done
  } >"$path.new"
  mv -f "$path.new" "$path"
  say "wrote $path"
}

# Every shell on the VM talks to the registry without --registry.
if [[ -n ${EBPFLB_REGISTRY:-} ]]; then
  echo "export EBPFLB_REGISTRY=$EBPFLB_REGISTRY" >/etc/profile.d/ebpflb.sh
fi

provision_control() {
  need EBPFLB_LISTEN
  # A TCP listener requires mTLS unless told otherwise; the VMs' private network
  # runs it plain (docs/vagrant.md says how to move them to certificates).
  EBPFLB_REGISTRY_ARGS=--insecure-tcp
  env_file "$ETC/registry.env" EBPFLB_LISTEN EBPFLB_REGISTRY_ARGS
  systemctl enable ebpflb-registry.service
  systemctl restart ebpflb-registry.service
  local deadline=$((SECONDS + 120))
  until ebpflb --registry "$EBPFLB_LISTEN" get nodes >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      journalctl -u ebpflb-registry.service -n 40 --no-pager >&2 || true
      die "the registry does not answer on $EBPFLB_LISTEN"
    fi
    sleep 1
  done
  say "registry serving on $EBPFLB_LISTEN (unauthenticated: private network only)"
}

provision_node() {
  local name
  for name in EBPFLB_REGISTRY EBPFLB_NODE EBPFLB_NODE_IP EBPFLB_POD_CIDR; do need "$name"; done
  EBPFLB_POD_ROUTES=${EBPFLB_POD_ROUTES:-}
  if [[ -z ${EBPFLB_EXTERNAL_IFACE:-} ]]; then
    EBPFLB_EXTERNAL_IFACE=$(ip -o -4 addr show | awk -v ip="$EBPFLB_NODE_IP" \
      '{ split($4, a, "/"); if (a[1] == ip) { print $2; exit } }')
    [[ -n $EBPFLB_EXTERNAL_IFACE ]] || die "no interface holds $EBPFLB_NODE_IP"
  fi
  env_file "$ETC/node.env" EBPFLB_REGISTRY EBPFLB_NODE EBPFLB_NODE_IP EBPFLB_POD_CIDR \
    EBPFLB_POD_ROUTES EBPFLB_EXTERNAL_IFACE
  systemctl enable ebpflb-pod-network.service ebpflb-agent.service
  systemctl restart ebpflb-pod-network.service
  systemctl restart ebpflb-agent.service
  # Done when the agent has registered this node. The registry may still be
  # provisioning (`vagrant up` in parallel): wait, unless the agent keeps crashing.
  local deadline=$((SECONDS + 900)) restarts
  until ebpflb --registry "$EBPFLB_REGISTRY" get node "$EBPFLB_NODE" >/dev/null 2>&1; do
    restarts=$(systemctl show -p NRestarts --value ebpflb-agent.service)
    if ((SECONDS > deadline || ${restarts:-0} >= 3)); then
      journalctl -u ebpflb-agent.service -n 40 --no-pager >&2 || true
      die "node $EBPFLB_NODE not registered (agent restarts: ${restarts:-?})"
    fi
    sleep 2
  done
  say "node $EBPFLB_NODE ($EBPFLB_NODE_IP, pods $EBPFLB_POD_CIDR, NodePort on" \
    "$EBPFLB_EXTERNAL_IFACE) registered with $EBPFLB_REGISTRY"
}

"provision_$ROLE"
