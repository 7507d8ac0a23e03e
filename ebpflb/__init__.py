"""ebpflb: Kubernetes-style Service load balancing with an eBPF datapath."""
