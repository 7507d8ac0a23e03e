#!/usr/bin/env bash
# A node's pod network, from the environment (ebpflb-pod-network.service reads
# /etc/ebpflb/node.env and runs this at every boot; deploy/provision.sh too):
#   - /etc/cni/net.d/10-ebpflb.conflist: the CNI `bridge` plugin on cni0 with
#     `host-local` addresses from EBPFLB_POD_CIDR (gateway: its first address),
#     the same network configuration ebpflb/cluster/cni.py gives the namespace
#     cluster's nodes;
#   - forwarding on, reverse-path filtering off (a NATing datapath makes flows
#     that look asymmetric on purpose, as the namespace cluster also allows);
#   - a route to every other node's pod CIDR via that node's address, from
#     EBPFLB_POD_ROUTES="CIDR=VIA CIDR=VIA ...".
# Idempotent: a second run changes nothing.
set -euo pipefail

: "${EBPFLB_POD_CIDR:?set EBPFLB_POD_CIDR to the pod subnet of this node, e.g. 10.244.1.0/24}"
EBPFLB_POD_ROUTES=${EBPFLB_POD_ROUTES:-}
CNI_CONF_DIR=${CNI_CONF_DIR:-/etc/cni/net.d}
CONFLIST=$CNI_CONF_DIR/10-ebpflb.conflist
SYSCTL_CONF=/etc/sysctl.d/60-ebpflb.conf
BRIDGE=cni0
# host-local's leases live in /run: they go at reboot, as the pods' namespaces do.
IPAM_DIR=/run/cni/ebpflb

say() { printf 'pod-network: %s\n' "$*"; }
die() { printf 'pod-network: %s\n' "$*" >&2; exit 1; }

ip_to_int() {
  local IFS=. a b c d
  read -r a b c d <<<"$1"
  echo $(((a << 24) | (b << 16) | (c << 8) | d))
}
int_to_ip() { echo "$(($1 >> 24 & 255)).$(($1 >> 16 & 255)).$(($1 >> 8 & 255)).$(($1 & 255))"; }

[[ $EBPFLB_POD_CIDR =~ ^([0-9]{1,3}(\.[0-9]{1,3}){3})/([0-9]{1,2})$ ]] ||
  die "EBPFLB_POD_CIDR=$EBPFLB_POD_CIDR: want A.B.C.D/N"
prefix=${BASH_REMATCH[3]}
((prefix >= 8 && prefix <= 30)) || die "EBPFLB_POD_CIDR=$EBPFLB_POD_CIDR: want a /8 to /30"
mask=$(((0xffffffff << (32 - prefix)) & 0xffffffff))
network=$(($(ip_to_int "${BASH_REMATCH[1]}") & mask))
subnet="$(int_to_ip "$network")/$prefix"
gateway=$(int_to_ip $((network + 1)))

# Write $1 from stdin only when it differs, so a rerun says "unchanged".
install_file() {
  local path=$1 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  if cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    say "$path unchanged"
  else
    chmod 0644 "$tmp"
    mv -f "$tmp" "$path"
    say "wrote $path"
  fi
}

mkdir -p "$CNI_CONF_DIR"
install_file "$CONFLIST" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ebpflb",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$subnet", "gateway": "$gateway"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$IPAM_DIR"
      }
    }
  ]
}
EOF

install_file "$SYSCTL_CONF" <<EOF
# ebpflb pod network (deploy/pod-network.sh): nodes route their pods' traffic,
# and the NATing datapath makes flows that fail strict reverse-path checks.
net.ipv4.ip_forward = 1
net.ipv4.conf.all.rp_filter = 0
net.ipv4.conf.default.rp_filter = 0
EOF
sysctl -q -p "$SYSCTL_CONF"
# `all` only raises the bar: interfaces that exist already keep their own value.
for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 >"$f"; done

for pair in $EBPFLB_POD_ROUTES; do
  cidr=${pair%%=*}
  via=${pair#*=}
  [[ -n $cidr && -n $via && $cidr != "$pair" ]] || die "EBPFLB_POD_ROUTES: $pair: want CIDR=VIA"
  # The node network may still be coming up at boot: retry for a while.
  for try in $(seq 30); do
    if ip route replace "$cidr" via "$via" proto static 2>/dev/null; then
      say "route $cidr via $via"
      break
    fi
    ((try < 30)) || die "cannot add route $cidr via $via: $(ip route replace "$cidr" via "$via" 2>&1)"
    sleep 1
  done
done
say "pods on $BRIDGE get $subnet (gateway $gateway)"
