#!/usr/bin/env bash
# `make setup`: installs, idempotently, everything ebpflb needs on Debian 12 and
# says what it did. A second run changes nothing and takes seconds.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

say() { printf 'setup: %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: bcc and its kernel headers, the tools the datapath and the
# namespace cluster use, and the servers the demo and the tests run.
packages=(
  python3-bpfcc python3-venv python3-yaml bpftool linux-headers-amd64
  iproute2 iptables nftables containernetworking-plugins
  nginx-light curl socat iperf3
  etcd-server  # the HA store's tests run a 3-member etcd on loopback
  vagrant  # only for `vagrant validate` in the tests; VMs need a provider too (docs/vagrant.md)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts nginx on install; ebpflb runs its own nginx inside pods.
  if [[ " ${missing[*]} " == *" nginx-light "* ]] && command -v systemctl >/dev/null; then
    as_root systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
  # Nor is etcd a service here: the tests (and `--store etcd://`) run their own members.
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
    as_root systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
else
  say "Debian packages: all ${#packages[@]} present"
fi

# bcc compiles against /lib/modules/$(uname -r)/build. This kernel ships no
# headers, so point build/ and source/ at Debian's linux-headers-amd64 (the
# arch folder alone lacks include/linux/kconfig.h: source/ must be there too).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
  arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$arch" ] && [ -n "$common" ] || { say "no Debian kernel headers under /usr/src"; exit 1; }
  as_root mkdir -p "$kdir"
  as_root ln -sfn "$arch" "$kdir/build"
  as_root ln -sfn "$common" "$kdir/source"
  say "kernel headers for bcc: $kdir/build -> $arch, $kdir/source -> $common"
else
  say "kernel headers for bcc: $kdir/build present"
fi

# The bpffs, where the agent pins its maps.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  as_root mount -t bpf bpf /sys/fs/bpf
  say "mounted the bpffs at /sys/fs/bpf"
fi

# The venv: Debian's python3 with --system-site-packages, so `import bcc` works.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  say "made .venv (Debian's python3, sees Debian's bcc)"
fi
stamp=.venv/.ebpflb-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
  say "installed ebpflb and its test extras into .venv"
else
  say "ebpflb already installed in .venv"
fi
