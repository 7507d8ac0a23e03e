"""`ebpflb bench`: ebpflb against no load balancer and kube-proxy's iptables and nftables modes."""

from ebpflb.bench.cli import arguments, main, run

__all__ = ["arguments", "main", "run"]
