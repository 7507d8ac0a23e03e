/* Source NAT of NodePort flows to remote backends: the client's address and
 * port become the node's SNAT address and a port allocated here, so that the
 * backend's node routes the replies back through this node (which alone
 * knows the client and the frontend).
 *
 * A port is taken by inserting the flow's reverse entry (backend -> SNAT
 * address:port) with BPF_NOEXIST: two clients that use the same source port
 * (or one client's flows to two NodePorts sharing a backend) never get the
 * same reverse tuple, and two CPUs racing for one port cannot both win.
 */
#ifndef LB_SNAT_H
#define LB_SNAT_H

#include "conntrack.h"
#include "lb.h"
#include "lb_maps.h"
#include "node.h"

/* Ports tried per new flow: the first at a hash of the client's tuple (so a
 * flow that lost its forward entry finds its own reverse entry again), the
 * next ones after it. */
#define LB_SNAT_TRIES 16

/* The reverse entry at this SNAT port is this flow's own. */
static __always_inline int lb_snat_is_own(const struct lb_ct_value *e, const struct lb_flow *f)
{
	return e->nat_addr == f->client && e->nat_port == f->client_port && e->addr == f->vip &&
	       e->port == f->vip_port;
}

/* Claim one SNAT port, the reverse entry written as value v. */
static __always_inline int lb_snat_claim(struct lb_ct_key *k, struct lb_ct_value *v,
					 const struct lb_flow *f, __u64 now)
{
	struct lb_ct_value *e;

	if (conntrack.insert(k, v) == 0)
		return 0;
	e = conntrack.lookup(k);
	if (!e)
		return conntrack.insert(k, v); /* deleted meanwhile */
	if (lb_snat_is_own(e, f))
		return conntrack.update(k, v);
	if (!ct_expired(e, now))
		return -1;
	/* Left by a finished flow the GC has not removed yet. */
	conntrack.delete(k);
	return conntrack.insert(k, v);
}

/* Make f a SNATed flow: source the node's SNAT address and a free port,
 * whose reverse entry is written. f's backend is set. Returns 0, or -1 when
 * no SNAT address is configured or LB_SNAT_TRIES ports were all taken. */
static __always_inline int lb_snat_alloc(struct lb_flow *f, const struct lb_node_config *cfg,
					 __u32 hash, __u64 now)
{
	struct lb_ct_key k;
	struct lb_ct_value v;
	__u32 first, range;

	if (!cfg || !lb_snat_ip(cfg) || cfg->snat_port_max < cfg->snat_port_min ||
	    !cfg->snat_port_min)
		return -1;
	range = (__u32)cfg->snat_port_max - cfg->snat_port_min + 1;
	first = lb_mix32(hash ^ 0x51a7) % range;

	f->flags |= LB_CT_F_SNAT;
	f->nat_addr = lb_snat_ip(cfg);
	ct_reverse_value(&v, f, now);
	lb_reply_mark(f->backend); /* every try's reverse key has it */
	for (__u32 i = 0; i < LB_SNAT_TRIES && i < range; i++) {
		f->nat_port = lb_htons(cfg->snat_port_min + (first + i) % range);
		ct_reverse_key(&k, f);
		if (lb_snat_claim(&k, &v, f, now) == 0)
			return 0;
	}
	return -1;
}

#endif /* LB_SNAT_H */
