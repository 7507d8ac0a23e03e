"""The namespace cluster (nodes, pods, clients as network namespaces): e2e harness and demo."""

from ebpflb.cluster.cleanup import (
    PREFIX_BASE,
    cleanup_stale,
    leftovers,
    new_prefix,
    stale_prefixes,
)
from ebpflb.cluster.clients import ClientError, connect_errno, curl, tcp_request, udp_request
from ebpflb.cluster.cluster import (
    EXTERNAL_IP,
    POD_NETWORK,
    UNDERLAY_NETWORK,
    Cluster,
    ClusterError,
    External,
    Node,
    Pod,
    Target,
)
from ebpflb.cluster.cni import Attachment, BridgeNetwork, CniError
from ebpflb.cluster.netns import MARKER_ENV, Netns, NetnsError
from ebpflb.cluster.servers import Server, ServerError

__all__ = [
    "EXTERNAL_IP",
    "MARKER_ENV",
    "POD_NETWORK",
    "PREFIX_BASE",
    "UNDERLAY_NETWORK",
    "Attachment",
    "BridgeNetwork",
    "ClientError",
    "CniError",
    "Cluster",
    "ClusterError",
    "External",
    "Netns",
    "NetnsError",
    "Node",
    "Pod",
    "Server",
    "ServerError",
    "Target",
    "cleanup_stale",
    "connect_errno",
    "curl",
    "leftovers",
    "new_prefix",
    "stale_prefixes",
    "tcp_request",
    "udp_request",
]
