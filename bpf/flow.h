/* Per-packet decisions for the two directions of a balanced connection,
 * shared by every entry point (tc and XDP): client -> VIP (DNAT to a
 * backend, and SNAT when a NodePort backend is on another node) and
 * backend -> client (reverse NAT).
 *
 * The decisions only read and write maps; they return what to do with the
 * packet (struct lb_nat), and tc.h / xdp.h do it with their own means.
 */
#ifndef LB_FLOW_H
#define LB_FLOW_H

#include "conntrack.h"
#include "counters.h"
#include "filter.h"
#include "lb.h"
#include "lb_maps.h"
#include "node.h"
#include "parse.h"
#include "snat.h"

/* What to do with a packet once the maps have been consulted. */
enum lb_action {
	LB_ACT_NEXT = -1, /* not decided: the next lookup decides */
	LB_ACT_PASS,   /* no frontend, no flow: leave it untouched */
	LB_ACT_NAT,    /* rewrite it as struct lb_nat says and send it on */
	LB_ACT_REFUSE, /* a frontend without backends: answer with RST / ICMP */
	LB_ACT_DROP,   /* cannot be balanced (no SNAT port): drop it */
};

/* How a rewritten packet goes on. */
enum lb_route {
	LB_ROUTE_STACK,	 /* to the kernel, which routes it (to a pod, a local backend) */
	LB_ROUTE_BOUNCE, /* back out of the interface it came in on, MACs swapped (hairpin) */
	LB_ROUTE_FIB,	 /* routed by the program (FIB lookup, redirect): its new source is
			  * a node address, which the kernel's input path drops as martian */
};

/* The rewrite: the packet's new 4-tuple and its way on. */
struct lb_nat {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 route; /* enum lb_route */
	__u8 dir;   /* LB_CT_FORWARD (a client's packet) or LB_CT_REVERSE (a reply) */
	__u8 flags; /* the flow's LB_CT_F_* (hairpin, SNAT) */
	__u8 pad;
};

/* The maps' generation (struct lb_id_state): the agent raises it after every batch of
 * writes that may stop a known flow (a service, membership or backend deleted or
 * changed), so a forward entry that recorded it, read before its flow was last found valid,
 * is still valid while it is current. 0: none vouches (no agent wrote it yet, or maps
 * migrated from a layout before it). */
static __always_inline __u32 lb_map_gen(void)
{
	__u32 zero = 0;
	struct lb_id_state *s = id_state.lookup(&zero);

	return s ? *(volatile const __u32 *)&s->map_gen : 0;
}

/* A forward entry that cannot be used for this packet: expired, made by a
 * service that has since been deleted and recreated (other id), or a new SYN
 * on a tuple whose connection was closing (a new connection: balance it
 * anew, as the kernel's conntrack does). */
static __always_inline int lb_ct_usable(const struct lb_ct_value *e,
					const struct lb_svc_value *svc, const struct lb_pkt *p,
					__u64 now, struct lb_counters *c)
{
	if (ct_expired(e, now)) {
		LB_COUNT(c, ct_expired);
		return 0;
	}
	if (e->svc_id != svc->svc_id)
		return 0;
	if ((e->flags & LB_CT_F_CLOSING) && lb_tcp_is_syn(p))
		return 0;
	return 1;
}

/* The service's generation, read once: before the membership or the selection table, as
 * lb_ct_member() needs. */
static __always_inline __u8 lb_svc_gen(const struct lb_svc_value *svc)
{
	return *(volatile const __u8 *)&svc->gen;
}

/* The backend of a usable forward entry is still in the service. The generation says so
 * without a lookup: the agent raises the service's gen only after deleting a membership, so
 * an entry that holds the current gen, recorded when its backend was selected or last found
 * a member (the gen read before that), still has its backend. Else the membership is looked
 * up and the entry takes the gen. A gen of 0 (a service written without one, maps from
 * before generations) never vouches. The gen comes round after 255 raises, so it vouches
 * only for an entry that needs no refresh (fresh): each refresh, at least once per
 * LB_CT_REFRESH_NS of traffic, looks the membership up again, and a wrong vouch would take
 * 255 raises of one service in that time. */
static __always_inline int lb_ct_member(struct lb_ct_value *e, __u32 svc_id, __u8 gen,
					const int fresh)
{
	if (fresh && gen && e->svc_gen == gen)
		return 1;
	if (!lb_is_member(svc_id, e->backend_id))
		return 0;
	e->svc_gen = gen;
	return 1;
}

/* Point the flow at a freshly selected backend, and decide the source the
 * backend sees: the client itself, or the hairpin address when the backend
 * is the client (a pod reaching itself). External clients never hairpin: a
 * pod of another node that reaches itself through this node's NodePort is a
 * remote backend, SNATed. */
static __always_inline void lb_flow_set_backend(struct lb_flow *f, const struct lb_backend_value *b,
						__u32 backend_id, const int external)
{
	f->backend = b->addr;
	f->backend_port = b->port;
	f->backend_id = backend_id;
	f->flags &= ~(LB_CT_F_HAIRPIN | LB_CT_F_SNAT);
	f->nat_addr = f->client;
	f->nat_port = f->client_port;
	if (!external && b->addr == f->client) {
		f->flags |= LB_CT_F_HAIRPIN;
		f->nat_addr = LB_HAIRPIN_IP;
	}
}

/* The rewrite of a client's packet for flow f. */
static __always_inline void lb_forward_nat(const struct lb_flow *f, struct lb_nat *n)
{
	n->saddr = f->nat_addr;
	n->daddr = f->backend;
	n->sport = f->nat_port;
	n->dport = f->backend_port;
	n->dir = LB_CT_FORWARD;
	n->flags = f->flags;
	if (ct_is_hairpin(f))
		n->route = LB_ROUTE_BOUNCE;
	else if (ct_is_snat(f))
		n->route = LB_ROUTE_FIB;
	else
		n->route = LB_ROUTE_STACK;
}

/* Remember the flow (both conntrack entries). Returns 0 if both were written. */
static __always_inline int lb_flow_save(const struct lb_flow *f, __u64 now, struct lb_counters *c)
{
	if (ct_write(f, now)) {
		LB_COUNT(c, errors); /* forwarded anyway: its replies will not be reverse-NATed */
		return -1;
	}
	return 0;
}

/* The flow of a client's packet: its conntrack entry if usable (moved at once
 * off a backend that left the service), else a newly balanced one. Fills f.
 * external: the packet came in on an external interface, where a backend on
 * another node gets the client SNATed (cfg gives the address and ports). */
static __always_inline int lb_forward_flow(const struct lb_pkt *p, const struct lb_svc_value *svc,
					   const struct lb_node_config *cfg, const int external,
					   struct lb_flow *f, struct lb_ct_value *e, __u64 now,
					   __u32 map_gen, struct lb_counters *c)
{
	const __u8 gen = lb_svc_gen(svc);
	struct lb_backend_value *b;
	__u32 backend_id = 0;
	__u8 flags;
	int refresh;

	if (e && lb_ct_usable(e, svc, p, now, c)) {
		LB_COUNT(c, ct_hits);
		ct_flow_from_forward(f, p, e);
		flags = ct_next_flags(f->flags, p, 1);
		refresh = ct_needs_refresh(e, flags, now);
		if (lb_ct_member(e, svc->svc_id, gen, !refresh)) {
			if (!refresh) {
				if (e->map_gen != map_gen)
					e->map_gen = map_gen;
				return LB_ACT_NAT;
			}
			f->flags = flags;
			f->svc_gen = gen;
			f->map_gen = map_gen;
			if (lb_svc_has_affinity(svc))
				lb_affinity_touch(svc, f->client, f->backend_id, now);
			lb_flow_save(f, now, c);
			return LB_ACT_NAT;
		}
		/* The backend left the service: move the flow now. TCP: the new backend answers the
		 * next segment with a RST, so the client learns at once. */
		LB_COUNT(c, reselects);
		ct_delete_reverse(f);
	} else {
		LB_COUNT(c, ct_misses);
		if (!e && p->proto == IPPROTO_TCP && !(p->tcp_flags & LB_TCP_SYN))
			LB_COUNT(c, ct_lost); /* mid-flow: its entry was evicted or collected */
		if (e) {
			/* A dead entry is replaced: its reply entry goes too. */
			struct lb_flow old = {};

			ct_flow_from_forward(&old, p, e);
			ct_delete_reverse(&old);
		}
		flags = ct_next_flags(0, p, 1);
	}

	f->svc_gen = gen;
	f->map_gen = map_gen;
	b = lb_select_backend(svc, p, now, &backend_id, c);
	if (!b)
		return LB_ACT_REFUSE;
	f->flags = flags;
	lb_flow_set_backend(f, b, backend_id, external);
	if (external && !lb_backend_is_local(b)) {
		if (lb_snat_alloc(f, cfg, lb_flow_hash(p), now)) {
			LB_COUNT(c, snat_no_port);
			return LB_ACT_DROP;
		}
	}
	if (!lb_flow_save(f, now, c))
		LB_COUNT(c, ct_created);
	return LB_ACT_NAT;
}

/* client -> VIP: find or make the flow; the rewrite is DNAT (plus SNAT to the
 * hairpin or the node's address). e: the packet's forward entry, or NULL (looked up by
 * lb_forward_known()); map_gen: lb_map_gen(), read before svc was looked up. */
static __always_inline int lb_forward(const struct lb_pkt *p, const struct lb_svc_value *svc,
				      const struct lb_node_config *cfg, const int external,
				      struct lb_ct_value *e, __u32 map_gen, struct lb_nat *n,
				      struct lb_counters *c)
{
	struct lb_flow f = {
		.client = p->saddr, .vip = p->daddr, .client_port = p->sport,
		.vip_port = p->dport, .proto = p->proto, .svc_id = svc->svc_id,
	};
	int act = lb_forward_flow(p, svc, cfg, external, &f, e, lb_now(), map_gen, c);

	if (act != LB_ACT_NAT)
		return act;
	lb_forward_nat(&f, n);
	return LB_ACT_NAT;
}

/* client -> VIP, for a known flow whose forward entry the maps' generation vouches for
 * (lb_map_gen()): its rewrite without looking the frontend up, as lb_forward() would
 * find it. Whatever needs more (no entry, another gen, expired, a refresh due, a new SYN
 * on a closing flow) is LB_ACT_NEXT: lb_forward() decides, on the entry looked up here
 * (*found, NULL if there is none). The entry's service, its
 * membership and its frontend's kind (a NodePort's) were valid when the entry took the
 * gen, and the agent raises the gen after any write that could change that. Like the
 * service's gen in lb_ct_member(), it vouches only for an entry that needs no refresh. */
static __always_inline int lb_forward_known(const struct lb_pkt *p, __u32 map_gen,
					    struct lb_ct_value **found, struct lb_nat *n,
					    struct lb_counters *c)
{
	struct lb_ct_key key;
	struct lb_ct_value *e;
	struct lb_flow f = {};
	__u64 now;

	ct_packet_key(&key, p, LB_CT_FORWARD);
	e = conntrack.lookup(&key);
	*found = e;
	if (!e || !map_gen || e->map_gen != map_gen)
		return LB_ACT_NEXT;
	now = lb_now();
	if (ct_expired(e, now) || ct_needs_refresh(e, ct_next_flags(e->flags, p, 1), now) ||
	    ((e->flags & LB_CT_F_CLOSING) && lb_tcp_is_syn(p)))
		return LB_ACT_NEXT;
	LB_COUNT(c, ct_hits);
	ct_flow_from_forward(&f, p, e);
	lb_forward_nat(&f, n);
	return LB_ACT_NAT;
}

/* A packet to a frontend, if p's destination may be one: a known flow's rewrite
 * (lb_forward_known()), else what lb_forward() decides if the frontend exists (and is a
 * NodePort's, for an external client). LB_ACT_NEXT: to no frontend. */
static __always_inline int lb_to_frontend(const struct lb_pkt *p, const struct lb_node_config *cfg,
					  const int external, struct lb_nat *n,
					  struct lb_counters *c)
{
	struct lb_svc_value *svc;
	struct lb_ct_value *e;
	__u32 map_gen;
	int act;

	if (!lb_addr_may_be(p->daddr, LB_ADDR_FRONTEND))
		return LB_ACT_NEXT;
	map_gen = lb_map_gen(); /* before the lookup: see lb_map_gen() */
	act = lb_forward_known(p, map_gen, &e, n, c);
	if (act != LB_ACT_NEXT)
		return act;
	svc = lb_service(p);
	if (!svc || (external && !lb_svc_is_nodeport(svc)))
		return LB_ACT_NEXT;
	return lb_forward(p, svc, cfg, external, e, map_gen, n, c);
}

/* backend -> client: if this is the reply of a balanced flow, the rewrite
 * writes the VIP back as source (and the client as destination when the
 * flow was hairpinned or SNATed). snat_only: take only SNATed flows' replies
 * (on an external interface, where other replies are not ours to translate:
 * the pod's veth does that). routable: the packet is still to be routed (not
 * at egress), so a reply whose new source is a node address must be routed
 * by the program. */
static __always_inline int lb_reverse(const struct lb_pkt *p, const struct lb_node_config *cfg,
				      const int snat_only, const int routable, struct lb_nat *n,
				      struct lb_counters *c)
{
	struct lb_ct_key key;
	struct lb_ct_value *e;
	struct lb_flow f = {};
	__u64 now;
	__u8 flags;

	if (!lb_addr_may_be(p->saddr, LB_ADDR_BACKEND)) { /* a reply comes from a backend */
		LB_COUNT(c, passed);
		return LB_ACT_PASS;
	}
	if (!lb_reply_may_exist(p->saddr)) { /* a backend, of no balanced flow */
		LB_COUNT(c, passed);
		LB_COUNT(c, rev_skipped);
		return LB_ACT_PASS;
	}
	ct_packet_key(&key, p, LB_CT_REVERSE);
	e = conntrack.lookup(&key);
	if (!e || (snat_only && !(e->flags & LB_CT_F_SNAT))) {
		LB_COUNT(c, passed);
		return LB_ACT_PASS;
	}
	now = lb_now();
	if (ct_expired(e, now)) {
		LB_COUNT(c, passed);
		return LB_ACT_PASS;
	}
	ct_flow_from_reverse(&f, p, e);
	flags = ct_next_flags(f.flags, p, 0);
	if (ct_needs_refresh(e, flags, now)) {
		f.flags = flags;
		if (ct_refresh_from_reverse(e, &f, now))
			LB_COUNT(c, errors);
	}

	n->saddr = f.vip;
	n->daddr = f.client;
	n->sport = f.vip_port;
	n->dport = f.client_port;
	n->dir = LB_CT_REVERSE;
	n->flags = f.flags;
	if (ct_is_hairpin(&f))
		n->route = LB_ROUTE_BOUNCE;
	else if (routable && lb_is_node_ip(cfg, f.vip))
		n->route = LB_ROUTE_FIB;
	else
		n->route = LB_ROUTE_STACK;
	return LB_ACT_NAT;
}

/* Count a rewrite that was done. */
static __always_inline void lb_count_nat(struct lb_counters *c, const struct lb_nat *n)
{
	if (n->dir == LB_CT_FORWARD) {
		LB_COUNT(c, dnat);
		if (n->flags & LB_CT_F_SNAT)
			LB_COUNT(c, snat);
	} else {
		LB_COUNT(c, rev_nat);
		if (n->flags & LB_CT_F_SNAT)
			LB_COUNT(c, rev_snat);
	}
	if (n->flags & LB_CT_F_HAIRPIN)
		LB_COUNT(c, hairpin);
}

#endif /* LB_FLOW_H */
