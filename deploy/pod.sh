#!/usr/bin/env bash
# Pods on a VM node without a kubelet: a network namespace attached to the
# node's cni0 by the CNI plugins of /etc/cni/net.d/10-ebpflb.conflist (written
# by deploy/pod-network.sh), executed as the CNI spec says (the same way
# ebpflb/cluster/cni.py does for the namespace cluster), with nginx in it.
#
#   pod.sh add NAME [PORT]  make pod NAME with nginx answering "NAME\n" on PORT
#                           (default 80; 0: no server); prints the pod's IP once
#                           it answers and, if ebpflb-agent runs here, once the
#                           datapath is attached to its veth (waits up to
#                           $EBPFLB_ATTACH_TIMEOUT seconds, default 60; 0: no wait)
#   pod.sh del NAME         stop everything in it, CNI DEL, remove it (idempotent)
#   pod.sh ip NAME          print the pod's IP
#   pod.sh list             NAME IP HOST_VETH of every pod made here
#
# Run it as root on a node. Registering the pod (a Pod object with its IP) is
# the caller's business: `ebpflb apply`, as tests/vm/target.py does.
set -euo pipefail

CONFLIST=${EBPFLB_CNI_CONFLIST:-/etc/cni/net.d/10-ebpflb.conflist}
CNI_PATH=${CNI_PATH:-/usr/lib/cni}
STATE=${EBPFLB_POD_STATE:-/run/ebpflb-pods}
NGINX=/usr/sbin/nginx
IFNAME=eth0
ATTACH_TIMEOUT=${EBPFLB_ATTACH_TIMEOUT:-60}
PYTHON=${EBPFLB_PYTHON:-/opt/ebpflb/.venv/bin/python}

die() { printf 'pod.sh: %s\n' "$*" >&2; exit 1; }
usage() {
  echo "usage: pod.sh add NAME [PORT] | del NAME | ip NAME | list   (see the top of $0)" >&2
  exit 2
}

check_name() {
  [[ $1 =~ ^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$ ]] ||
    die "pod name '$1': lowercase letters, digits and '-', up to 32"
}

# The network configuration for plugin $1 of the list, as the spec has the
# runtime build it: the plugin's object plus the list's cniVersion and name,
# and prevResult ($2, a file, when given).
plugin_config() {
  python3 - "$CONFLIST" "$1" "${2:-}" <<'EOF'
import json, sys
conflist, index, prev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(conflist) as f:
    lst = json.load(f)
conf = dict(lst["plugins"][index])
conf["cniVersion"] = lst["cniVersion"]
conf["name"] = lst["name"]
if prev:
    with open(prev) as f:
        conf["prevResult"] = json.load(f)
print(json.dumps(conf))
EOF
}

plugin_count() { python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["plugins"]))' "$CONFLIST"; }

# Execute one plugin: CNI_* in the environment, the configuration on stdin,
# the result (or the spec's error object) on stdout.
exec_plugin() { # COMMAND NAME INDEX [PREV_RESULT_FILE]
  local command=$1 name=$2 conf type netns=/run/netns/$2
  conf=$(plugin_config "$3" "${4:-}")
  type=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["type"])' "$conf")
  [[ -e $netns ]] || netns=""
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    CNI_COMMAND="$command" CNI_CONTAINERID="$name" CNI_NETNS="$netns" \
    CNI_IFNAME="$IFNAME" CNI_PATH="$CNI_PATH" \
    "$CNI_PATH/$type" <<<"$conf"
}

# ip and host veth from an ADD result (CNI 1.0.0): "IP VETH".
parse_result() {
  python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ip = next(i["address"].split("/")[0] for i in r["ips"] if "." in i["address"])
veth = [i["name"] for i in r["interfaces"] if not i.get("sandbox") and i["name"] != "cni0"]
print(ip, veth[0] if len(veth) == 1 else "-")
EOF
}

nginx_conf() { # DIR PORT BODY
  cat <<EOF
daemon on;
master_process on;
worker_processes 1;
user root root;
pid $1/nginx.pid;
error_log $1/error.log notice;
events { worker_connections 512; }
http {
    access_log $1/access.log;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    default_type text/plain;
    keepalive_timeout 5s;
    server {
        listen $2;
        location / { return 200 "$3\n"; }
    }
}
EOF
}

wait_for() { # SECONDS WHAT COMMAND...
  local timeout=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what: not ready after ${timeout}s"
    sleep 0.2
  done
}

# A program at the veth's tc ingress: at its tcx hook (Linux 6.6+) or a clsact filter, as
# the agent's --tc-attach put it (bpftool 7.1 of Debian 12 does not list tcx).
attached() {
  "$PYTHON" -c 'import sys; from ebpflb.datapath.loader import tc_programs
sys.exit(not tc_programs(sys.argv[1], "ingress"))' "$1"
}

cmd_add() {
  local name=$1 port=${2:-80} dir ip veth i n prev=""
  check_name "$name"
  if ! [[ $port =~ ^[0-9]+$ ]] || ((port > 65535)); then die "port '$port': want 0..65535"; fi
  [[ -r $CONFLIST ]] || die "$CONFLIST missing: run deploy/pod-network.sh (ebpflb-pod-network.service)"
  dir=$STATE/$name
  [[ ! -e $dir ]] || die "pod $name exists (pod.sh del $name first)"
  mkdir -p "$dir"
  # Whatever fails from here on (die included) undoes the half-made pod.
  ADDING=$name
  trap 'cmd_del "$ADDING" >/dev/null 2>&1 || true' EXIT
  ip netns add "$name"
  ip -n "$name" link set lo up
  n=$(plugin_count)
  for ((i = 0; i < n; i++)); do
    exec_plugin ADD "$name" "$i" ${prev:+"$prev"} >"$dir/result.json.new" ||
      die "CNI ADD $name: $(cat "$dir/result.json.new")"
    mv "$dir/result.json.new" "$dir/result.json"
    prev=$dir/result.json
  done
  read -r ip veth < <(parse_result "$dir/result.json")
  echo "$ip $veth" >"$dir/addr"
  if ((port > 0)); then
    nginx_conf "$dir" "$port" "$name" >"$dir/nginx.conf"
    ip netns exec "$name" "$NGINX" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
    wait_for 30 "nginx in $name on $ip:$port" \
      ip netns exec "$name" curl -sf --max-time 2 "http://$ip:$port/"
  fi
  if ((ATTACH_TIMEOUT > 0)) && systemctl is-active --quiet ebpflb-agent 2>/dev/null; then
    wait_for "$ATTACH_TIMEOUT" "the datapath on $veth (pod $name)" attached "$veth"
  fi
  trap - EXIT
  echo "$ip"
}

cmd_del() {
  local name=$1 dir i n
  check_name "$name"
  dir=$STATE/$name
  # Everything running in the pod: nginx, and whatever was started in it.
  if [[ -e /run/netns/$name ]]; then
    local -a pids
    mapfile -t pids < <(ip netns pids "$name")
    if ((${#pids[@]})); then
      kill "${pids[@]}" 2>/dev/null || true
      sleep 0.5
      mapfile -t pids < <(ip netns pids "$name")
      ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
  fi
  # DEL runs the list in reverse, each plugin given the cached ADD result.
  if [[ -r $CONFLIST ]]; then
    n=$(plugin_count)
    for ((i = n - 1; i >= 0; i--)); do
      if [[ -s $dir/result.json ]]; then
        exec_plugin DEL "$name" "$i" "$dir/result.json" >/dev/null || true
      else
        exec_plugin DEL "$name" "$i" >/dev/null || true
      fi
    done
  fi
  [[ ! -e /run/netns/$name ]] || ip netns del "$name"
  rm -rf "$dir"
}

cmd_ip() {
  check_name "$1"
  [[ -r $STATE/$1/addr ]] || die "no pod $1 here"
  cut -d' ' -f1 "$STATE/$1/addr"
}

cmd_list() {
  local d
  for d in "$STATE"/*/addr; do
    [[ -e $d ]] || continue
    printf '%s %s\n' "$(basename "$(dirname "$d")")" "$(cat "$d")"
  done
}

[[ $(id -u) -eq 0 ]] || die "run as root"
case ${1:-} in
  add) [[ $# -ge 2 && $# -le 3 ]] || usage; cmd_add "$2" "${3:-80}" ;;
  del) [[ $# -eq 2 ]] || usage; cmd_del "$2" ;;
  ip) [[ $# -eq 2 ]] || usage; cmd_ip "$2" ;;
  list) [[ $# -eq 1 ]] || usage; cmd_list ;;
  *) usage ;;
esac
