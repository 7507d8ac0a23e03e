/* Map definitions, all pinned under LB_PIN_DIR.
 *
 * A map already pinned there is adopted as it is (bcc opens the pin), so a
 * restarted agent keeps every flow; the loader checks the adopted map's type
 * and sizes against these definitions first. While no agent runs, the
 * attached program keeps using the pinned maps.
 */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include "lb_config.h"
#include "lb_structs.h"

/* Frontends (VIP, port, proto) -> service id, backend count, affinity.
 * Written by the agent only. Full: the agent cannot add a Service (its sync
 * fails); existing ones keep working. */
BPF_TABLE_PINNED("hash", struct lb_svc_key, struct lb_svc_value, services, LB_MAX_SERVICES,
		 LB_PIN_DIR "/services");

/* The address filter: may this address be a frontend's (a VIP, a node address
 * of a NodePort) or a backend's? Two bits per slot of a hash of the address,
 * 32 slots to an entry, from entry 1 on; entry 0 is nonzero once the agent has
 * written every address (until then, as in maps migrated from before the
 * filter, every address may be either). Written by the agent only: a slot's
 * bit is set before the first entry with such an address is written, and
 * cleared after the last is deleted. A packet whose addresses are neither
 * skips the services and reverse conntrack lookups (lb_addr_may_be in filter.h).
 * Fixed size. */
BPF_TABLE_PINNED("array", __u32, __u64, addr_filter, LB_ADDR_FILTER_WORDS + 1,
		 LB_PIN_DIR "/addr_filter");

/* The reply filter: may a reverse conntrack entry keyed by this (backend)
 * address exist? Entry 0: the current epoch (LB_RF_EPOCH, filter.h); then two
 * bitmaps of one bit per address filter slot, epoch 0's at
 * 1..LB_REPLY_FILTER_WORDS, epoch 1's after it; a set bit says "no entry", so
 * all zeros (a new map) says "may" everywhere. The datapath clears an address's
 * bit in the current epoch's bitmap before it inserts a reverse entry; the
 * agent, at each conntrack GC pass, flips the epoch, waits for the programs
 * that may still clear bits in the old bitmap, and rewrites that one from the
 * reverse entries then in conntrack. A packet from an address set in both
 * skips the reverse lookup (lb_reply_may_exist). Never copied by a migration
 * (the new map starts all "may"). Fixed size. */
BPF_TABLE_PINNED("array", __u32, __u64, reply_filter, 2 * LB_REPLY_FILTER_WORDS + 1,
		 LB_PIN_DIR "/reply_filter");

/* Backends: backend id -> (address, port, proto). One entry per distinct
 * endpoint, shared by every service that uses it. Full: new backends cannot
 * be added. A flow whose backend id is gone is moved to a live backend. */
BPF_TABLE_PINNED("hash", __u32, struct lb_backend_value, backends, LB_MAX_BACKENDS,
		 LB_PIN_DIR "/backends");

/* (service id, slot) -> backend id: the selection table. Slots 0..count-1 are
 * live; a new flow takes slot hash % count. Full: backends cannot be added to
 * services. */
BPF_TABLE_PINNED("hash", struct lb_slot_key, __u32, service_backends, LB_MAX_SERVICE_BACKENDS,
		 LB_PIN_DIR "/service_backends");

/* (service id, backend id) -> slot: membership, checked on every packet of a
 * known flow so that a backend removed from one service (while still in
 * another) loses that service's flows. Same size as service_backends. */
BPF_TABLE_PINNED("hash", struct lb_member_key, __u32, service_members, LB_MAX_SERVICE_BACKENDS,
		 LB_PIN_DIR "/service_members");

/* Connections: two entries per flow. Forward (client -> VIP tuple) holds the
 * backend; reverse (backend -> client tuple, or backend -> hairpin address)
 * holds the VIP to write back. Written by the datapath, expired entries are
 * deleted by the agent's garbage collector. Full: LRU evicts the least
 * recently used entry; a flow that lost its forward entry is re-balanced by
 * the same hash (same backend if the backend set did not change) and a lost
 * reverse entry is recreated by the next refresh of its forward entry. */
BPF_TABLE_PINNED("lru_hash", struct lb_ct_key, struct lb_ct_value, conntrack, LB_MAX_CONNTRACK,
		 LB_PIN_DIR "/conntrack");

/* sessionAffinity ClientIP: (service id, client address) -> backend and last
 * use. Full: LRU evicts the least recently used client, whose next new
 * connection may land on another backend. */
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_value, affinity,
		 LB_MAX_AFFINITY, LB_PIN_DIR "/affinity");

/* Per-CPU counters, one entry; userspace sums the CPUs. */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_counters, counters, 1, LB_PIN_DIR "/counters");

/* This node's settings (addresses, SNAT ports, external interfaces), one
 * entry written by the agent. All zero (not yet written): no address is the
 * node's, so NodePort to remote backends is dropped (no SNAT source) and
 * replies are not redirected. */
BPF_TABLE_PINNED("array", __u32, struct lb_node_config, node_config, 1,
		 LB_PIN_DIR "/node_config");

/* Id allocator state for the agent, and the maps' generation (see struct lb_id_state); one
 * entry. */
BPF_TABLE_PINNED("array", __u32, struct lb_id_state, id_state, 1, LB_PIN_DIR "/id_state");

/* Socket-level load balancing (sock.h), unconnected UDP: (socket cookie,
 * backend) -> the VIP the process asked for, written when a datagram is
 * translated, read when the process asks for a datagram's source (and by
 * sockets connected before sock_peer existed, whose entries a migration
 * copied). Full: LRU evicts the least recently used socket, whose datagrams
 * then read as coming from the backend. */
BPF_TABLE_PINNED("lru_hash", struct lb_sock_key, struct lb_sock_value, sock_revnat,
		 LB_MAX_SOCK_REVNAT, LB_PIN_DIR "/sock_revnat");

/* Socket-level load balancing (sock.h), connected sockets (TCP, connected
 * UDP): socket storage, one struct lb_sock_peer per socket, written at
 * connect and read when the process asks for its peer or a datagram's source.
 * The kernel frees a socket's value with the socket, so nothing deletes at
 * close and nothing is evicted: no max_entries, never full (a value that
 * cannot be allocated leaves the connect to the tc path). The key is a
 * placeholder (the socket is the key); sk_storage maps must be BPF_F_NO_PREALLOC
 * and have BTF for key and value, which bcc provides. Cannot be listed or
 * copied from userspace: the agent never reads it, and a migration hands the
 * pinned map itself to the new programs when its layout is unchanged. */
BPF_TABLE_PINNED("sk_storage", int, struct lb_sock_peer, sock_peer, 0, LB_PIN_DIR "/sock_peer",
		 BPF_F_NO_PREALLOC);

#endif /* LB_MAPS_H */
