/* Key and value types of the maps, shared with userspace.
 *
 * Mirrored once in Python (ebpflb/datapath/structs.py); tests/datapath/
 * test_layout.py compares sizes and offsets with what bcc compiles from here.
 * Wire-order fields are __be32/__be16; every struct is padded explicitly so
 * that no compiler padding (garbage in hash keys) exists.
 */
#ifndef LB_STRUCTS_H
#define LB_STRUCTS_H

/* services: frontend -> service. */
struct lb_svc_key {
	__be32 vip;  /* frontend address (the ClusterIP) */
	__be16 port; /* frontend port */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;    /* always 0: part of the hash key */
};

#define LB_SVC_F_AFFINITY 0x1 /* sessionAffinity: ClientIP */
#define LB_SVC_F_NODEPORT 0x2 /* a NodePort frontend (a node address): also balanced on external
			       * interfaces, where remote backends get the client SNATed */

struct lb_svc_value {
	__u32 svc_id;		/* stable id: keys service_backends, service_members, affinity */
	__u16 count;		/* active slots 0..count-1 in service_backends; 0 = refuse clients */
	__u8 flags;		/* LB_SVC_F_* */
	__u8 gen;		/* generation, raised by the agent once a backend has left the service:
				 * 1..255, then 1 again (0: none kept); see lb_ct_member() */
	__u32 affinity_timeout; /* seconds an idle ClientIP affinity lasts (LB_SVC_F_AFFINITY) */
};

/* backends: backend_id -> address. */
struct lb_backend_value {
	__be32 addr; /* backend (pod) address */
	__be16 port; /* backend (target) port */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 flags;  /* LB_BE_F_* */
};

#define LB_BE_F_LOCAL 0x1 /* the backend runs on this node (no SNAT needed to reach it) */

/* service_backends: (service, slot) -> backend_id. */
struct lb_slot_key {
	__u32 svc_id; /* service */
	__u32 slot;   /* 0..count-1 */
};

/* service_members: (service, backend) -> slot; says "backend is in service". */
struct lb_member_key {
	__u32 svc_id;	  /* service */
	__u32 backend_id; /* backend */
};

/* service_members' value is a __u32: the backend's slot (for dumps only). */

#define LB_CT_FORWARD 0 /* client -> VIP, as sent by the client */
#define LB_CT_REVERSE 1 /* backend -> client (or -> hairpin / SNAT address), as sent by the backend */

/* conntrack: a packet's 5-tuple as seen at tc ingress, plus direction. */
struct lb_ct_key {
	__be32 saddr; /* source address */
	__be32 daddr; /* destination address */
	__be16 sport; /* source port */
	__be16 dport; /* destination port */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 dir;     /* LB_CT_FORWARD or LB_CT_REVERSE */
	__u16 pad;    /* always 0 */
};

#define LB_CT_F_HAIRPIN 0x1	/* backend == client: source NATed to the hairpin address */
#define LB_CT_F_ESTABLISHED 0x2 /* TCP: the client sent a packet without SYN */
#define LB_CT_F_CLOSING 0x4	/* TCP: FIN or RST seen in either direction */
#define LB_CT_F_SNAT 0x8	/* NodePort to a remote backend: source NATed to the node address
				 * and an allocated port, which key the reverse entry */

struct lb_ct_value {
	__u64 last_seen;   /* lb_now() (ns since boot, tick resolution) of the last refresh */
	__u32 lifetime;	   /* seconds the entry stays valid after last_seen (from its state) */
	__u32 svc_id;	   /* service that balanced the flow; another id in services = stale */
	__u32 backend_id;  /* backend the flow is pinned to */
	__be32 addr;	   /* forward: backend address (new daddr); reverse: VIP (new saddr) */
	__be32 nat_addr;   /* forward: source the backend sees (new saddr: the client, the hairpin
			    * or the SNAT address); reverse: client address (new daddr) */
	__be16 port;	   /* forward: backend port (new dport); reverse: VIP port (new sport) */
	__be16 nat_port;   /* forward: source port the backend sees (new sport: the client's or
			    * the SNAT port); reverse: client port (new dport) */
	__u8 flags;	   /* LB_CT_F_* */
	__u8 svc_gen;	   /* forward: the service's gen when the backend was last known in it */
	__u16 pad2;	   /* always 0 */
	__u32 map_gen;	   /* forward: the maps' gen (lb_id_state) when the flow was last found
			    * valid: while it is current, a hit needs no services lookup */
};

/* affinity: (service, client) -> backend, for sessionAffinity ClientIP. */
struct lb_affinity_key {
	__u32 svc_id;  /* service */
	__be32 client; /* client (source) address */
};

struct lb_affinity_value {
	__u64 last_used;  /* lb_now() (ns since boot, tick resolution) of the client's last use */
	__u32 backend_id; /* backend the client sticks to */
	__u32 pad;	  /* always 0 */
};

/* counters: per-CPU packet counts, one named field per outcome. Every program
 * shares them: a packet crossing two hooks (pod ingress and egress, XDP then
 * tc) counts at each. */
struct lb_counters {
	__u64 packets;	     /* every packet the program ran on */
	__u64 passed;	     /* IPv4 TCP/UDP for no frontend and no reply entry: untouched */
	__u64 other;	     /* not IPv4 TCP/UDP (ARP, IPv6, ICMP...): untouched */
	__u64 fragments;     /* IPv4 fragments: untouched (no L4 header in later ones) */
	__u64 malformed;     /* truncated or malformed headers: untouched */
	__u64 dnat;	     /* client -> VIP packets rewritten to a backend */
	__u64 rev_nat;	     /* backend -> client replies rewritten back to the VIP */
	__u64 hairpin;	     /* packets of flows whose backend is the client (subset of both) */
	__u64 ct_hits;	     /* client -> VIP packets of a known flow */
	__u64 ct_misses;     /* client -> VIP packets that started a flow (incl. expired) */
	__u64 ct_expired;    /* of the misses: an entry existed but had expired */
	__u64 reselects;     /* flows whose backend left the service, moved to a live one */
	__u64 affinity_hits; /* new flows sent to the client's affinity backend */
	__u64 no_backend;    /* packets to a frontend without backends: refused or dropped */
	__u64 errors;	     /* helper or map failures: packet dropped (or NAT not remembered) */
	/* NodePort on external interfaces (XDP and tc) */
	__u64 nodeport_xdp;	  /* packets of NodePort flows finished by XDP (NAT or refusal) */
	__u64 nodeport_tc;	  /* packets of NodePort flows finished by tc on an external interface */
	__u64 xdp_pass_to_tc;	  /* packets XDP left untouched for tc: see xdp.h for why */
	__u64 snat;		  /* client -> NodePort packets SNATed to the node (remote backend) */
	__u64 rev_snat;		  /* replies of SNATed flows translated back to the client */
	__u64 snat_no_port;	  /* new SNAT flows dropped: no free SNAT port (or no node address) */
	__u64 fib_redirect;	  /* packets routed by the program, neighbour known (MACs written) */
	__u64 fib_redirect_neigh; /* packets routed by tc, neighbour resolved by bpf_redirect_neigh */
	__u64 fib_fail;		  /* packets the program had to route but the FIB refused: dropped */
	/* conntrack pressure (fill level: ebpflb maps, conntrack.fill()) */
	__u64 ct_created; /* flows balanced anew and written (both entries): new, expired, moved */
	__u64 ct_lost;	  /* TCP packets without SYN to a frontend that found no forward entry:
			   * flows that lost it (LRU eviction of a full map, or collected) */
	/* socket-level load balancing (sock.h): per system call, not per packet */
	__u64 sock_xlate;  /* connects and datagrams sent to a frontend, given a backend */
	__u64 sock_revnat; /* peers and datagram sources written back from a backend to the VIP */
	/* the reply filter (filter.h) */
	__u64 rev_skipped; /* of passed: from a backend address with no reverse entry, not looked up */
};

/* node_config: this node's settings, written by the agent (one entry). */
#define LB_MAX_NODE_IPS 4
#define LB_MAX_EXT_IFACES 8

#define LB_IF_F_PARTIAL_CSUM 0x1 /* XDP here may see partial checksums (a veth: the sender's
				  * offload is still pending; XDP cannot tell) */
#define LB_IF_F_NO_XDP_TX 0x2	 /* XDP must not transmit here (native XDP on a veth whose peer
				  * runs no XDP program drops XDP_TX frames): tc does it */

struct lb_node_config {
	__be32 node_ips[LB_MAX_NODE_IPS];     /* this node's addresses (0: unused); [0] is the
					       * SNAT source, which every other node can reach */
	__u32 ext_ifindex[LB_MAX_EXT_IFACES]; /* external interfaces (0: unused) */
	__u32 ext_flags[LB_MAX_EXT_IFACES];   /* LB_IF_F_* of ext_ifindex[i] */
	__u16 snat_port_min;		      /* SNAT source ports, host order, inclusive */
	__u16 snat_port_max;
	__u32 pad; /* always 0 */
};

/* id_state: control-plane only (the program never reads it). Pinned with the
 * other maps so that a restarted agent never reuses an id that a conntrack
 * entry may still name. */
struct lb_id_state {
	__u32 next_svc_id;     /* next service id to hand out (ids start at 1) */
	__u32 next_backend_id; /* next backend id to hand out (ids start at 1) */
	__u32 map_gen;	       /* raised after every write of the agent that may stop a known
				* flow (lb_forward_known() in flow.h); 0: none vouches */
	__u32 pad;	       /* always 0 */
};

/* sock_revnat: what an unconnected UDP socket must be told about a datagram's
 * source. Keyed by the socket and the backend it was given (it may be given
 * several: one per VIP it sends to). */
struct lb_sock_key {
	__u64 cookie; /* bpf_get_socket_cookie(): unique per socket while the system runs */
	__be32 addr;  /* backend address */
	__be16 port;  /* backend port */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;     /* always 0 */
};

struct lb_sock_value {
	__be32 vip;  /* frontend address the process asked for */
	__be16 port; /* frontend port */
	__u16 pad;   /* always 0 */
};

/* sock_peer: a connected socket's (TCP, connected UDP) translation, in the
 * socket's own storage: the peer it was given and the one it must be told. */
struct lb_sock_peer {
	__be32 addr;	 /* backend address the socket is connected to */
	__be32 vip;	 /* frontend address the process asked for */
	__be16 port;	 /* backend port */
	__be16 vip_port; /* frontend port */
};

#endif /* LB_STRUCTS_H */
