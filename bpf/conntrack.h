/* Connection tracking: two entries per flow, their lifetimes, and the flow
 * they describe.
 *
 * Forward entry, keyed by the client's tuple (client -> VIP): the backend,
 * and the source the backend sees. Reverse entry, keyed by the backend's
 * reply tuple (backend -> that source: the client, the hairpin address, or
 * the node's SNAT address and port): the VIP to write back as source and the
 * client to write back as destination. Both are rewritten together (on a
 * state change, else at most every LB_CT_REFRESH_NS), so they expire
 * together and a lost one is recreated.
 */
#ifndef LB_CONNTRACK_H
#define LB_CONNTRACK_H

#include <linux/in.h>

#include "filter.h"
#include "lb_config.h"
#include "lb_maps.h"
#include "parse.h"

/* One balanced connection, whichever direction it was seen in. */
struct lb_flow {
	__be32 client;	     /* client address (source of its packets before NAT) */
	__be32 vip;	     /* frontend address the client dialled */
	__be32 backend;	     /* backend address */
	__be32 nat_addr;     /* source the backend sees: client, hairpin or SNAT address */
	__be16 client_port;  /* client port */
	__be16 vip_port;     /* frontend port */
	__be16 backend_port; /* backend port */
	__be16 nat_port;     /* source port the backend sees: the client's or the SNAT port */
	__u8 proto;	     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 flags;	     /* LB_CT_F_* */
	__u8 svc_gen;	     /* the service's gen under which the backend was known a member */
	__u8 pad;
	__u32 svc_id;	     /* service */
	__u32 backend_id;    /* backend */
	__u32 map_gen;	     /* the maps' gen under which the flow was last found valid */
};

static __always_inline int ct_is_hairpin(const struct lb_flow *f)
{
	return f->flags & LB_CT_F_HAIRPIN;
}

static __always_inline int ct_is_snat(const struct lb_flow *f)
{
	return f->flags & LB_CT_F_SNAT;
}

/* The datapath's clock: ns since boot at tick resolution, from jiffies_64
 * (LB_INITIAL_JIFFIES at boot, one per LB_TICK_NS of CLOCK_MONOTONIC: the
 * kernel's INITIAL_JIFFIES and TICK_NSEC, from the HZ the loader found, see
 * ebpflb/datapath/kclock.py). The verifier inlines bpf_jiffies64() into a
 * load (x86-64), where bpf_ktime_get_coarse_ns() is a helper call, ~30 ns a
 * packet. Lifetimes are seconds; it is CLOCK_MONOTONIC plus a constant of this
 * boot (-0.144 s in a VM) less up to a tick, so stamps of a datapath on
 * CLOCK_MONOTONIC_COARSE (older ones) stay meaningful. Where the loader found
 * no HZ it passes neither flag and the clock is CLOCK_MONOTONIC_COARSE, which
 * userspace then reads too (now_ns() in ebpflb/datapath/conntrack.py). */
static __always_inline __u64 lb_now(void)
{
#ifdef LB_TICK_NS
	return (bpf_jiffies64() - LB_INITIAL_JIFFIES) * LB_TICK_NS;
#else
	return bpf_ktime_get_coarse_ns();
#endif
}

/* now - then, 0 if another CPU stamped "then" a little after our "now". */
static __always_inline __u64 lb_age(__u64 now, __u64 then)
{
	return now > then ? now - then : 0;
}

/* Seconds an entry lives after its last refresh, by protocol and state. */
static __always_inline __u32 ct_lifetime(__u8 proto, __u8 flags)
{
	if (proto != IPPROTO_TCP)
		return LB_CT_LIFETIME_UDP;
	if (flags & LB_CT_F_CLOSING)
		return LB_CT_LIFETIME_CLOSE;
	if (flags & LB_CT_F_ESTABLISHED)
		return LB_CT_LIFETIME_TCP;
	return LB_CT_LIFETIME_SYN;
}

/* The flow's state after packet p (forward: sent by the client). */
static __always_inline __u8 ct_next_flags(__u8 flags, const struct lb_pkt *p, int forward)
{
	if (p->proto != IPPROTO_TCP)
		return flags;
	if (p->tcp_flags & (LB_TCP_FIN | LB_TCP_RST))
		return flags | LB_CT_F_CLOSING;
	if (forward && !(p->tcp_flags & LB_TCP_SYN))
		flags |= LB_CT_F_ESTABLISHED;
	return flags;
}

static __always_inline int ct_expired(const struct lb_ct_value *e, __u64 now)
{
	return lb_age(now, e->last_seen) > (__u64)e->lifetime * LB_NSEC_PER_SEC;
}

static __always_inline int ct_needs_refresh(const struct lb_ct_value *e, __u8 flags, __u64 now)
{
	return flags != e->flags || lb_age(now, e->last_seen) >= LB_CT_REFRESH_NS;
}

/* The key of the packet's own tuple, in direction dir: a client's packet looks up its
 * forward entry, a backend's reply its reverse entry. */
static __always_inline void ct_packet_key(struct lb_ct_key *k, const struct lb_pkt *p, __u8 dir)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->dir = dir;
	k->pad = 0;
}

/* The tuple the client sends: client -> VIP. */
static __always_inline void ct_forward_key(struct lb_ct_key *k, const struct lb_flow *f)
{
	k->saddr = f->client;
	k->daddr = f->vip;
	k->sport = f->client_port;
	k->dport = f->vip_port;
	k->proto = f->proto;
	k->dir = LB_CT_FORWARD;
	k->pad = 0;
}

/* The tuple the backend replies with: backend -> the source it saw (the
 * client, the hairpin address, the node's SNAT address and port). */
static __always_inline void ct_reverse_key(struct lb_ct_key *k, const struct lb_flow *f)
{
	k->saddr = f->backend;
	k->daddr = f->nat_addr;
	k->sport = f->backend_port;
	k->dport = f->nat_port;
	k->proto = f->proto;
	k->dir = LB_CT_REVERSE;
	k->pad = 0;
}

static __always_inline void ct_fill_value(struct lb_ct_value *v, const struct lb_flow *f, __u64 now)
{
	v->last_seen = now;
	v->lifetime = ct_lifetime(f->proto, f->flags);
	v->svc_id = f->svc_id;
	v->backend_id = f->backend_id;
	v->flags = f->flags;
	v->svc_gen = f->svc_gen;
	v->pad2 = 0;
	v->map_gen = f->map_gen;
}

/* The reverse entry's value: the VIP as new source, the client as new destination. */
static __always_inline void ct_reverse_value(struct lb_ct_value *v, const struct lb_flow *f,
					     __u64 now)
{
	ct_fill_value(v, f, now);
	v->addr = f->vip;
	v->port = f->vip_port;
	v->nat_addr = f->client;
	v->nat_port = f->client_port;
}

/* Write (create or replace) both entries of a flow. */
static __always_inline int ct_write(const struct lb_flow *f, __u64 now)
{
	struct lb_ct_key k;
	struct lb_ct_value v;

	ct_forward_key(&k, f);
	ct_fill_value(&v, f, now);
	v.addr = f->backend;
	v.port = f->backend_port;
	v.nat_addr = f->nat_addr;
	v.nat_port = f->nat_port;
	if (conntrack.update(&k, &v))
		return -1;

	ct_reverse_key(&k, f);
	ct_reverse_value(&v, f, now);
	lb_reply_mark(k.saddr); /* before the entry exists */
	return conntrack.update(&k, &v);
}

static __always_inline void ct_delete_reverse(const struct lb_flow *f)
{
	struct lb_ct_key k;

	ct_reverse_key(&k, f);
	conntrack.delete(&k);
}

/* The flow of a client's packet and its forward entry. */
static __always_inline void ct_flow_from_forward(struct lb_flow *f, const struct lb_pkt *p,
						 const struct lb_ct_value *e)
{
	f->client = p->saddr;
	f->vip = p->daddr;
	f->client_port = p->sport;
	f->vip_port = p->dport;
	f->proto = p->proto;
	f->backend = e->addr;
	f->backend_port = e->port;
	f->nat_addr = e->nat_addr;
	f->nat_port = e->nat_port;
	f->flags = e->flags;
	f->svc_gen = e->svc_gen;
	f->svc_id = e->svc_id;
	f->backend_id = e->backend_id;
	f->map_gen = e->map_gen;
}

/* The flow of a backend's reply and its reverse entry. */
static __always_inline void ct_flow_from_reverse(struct lb_flow *f, const struct lb_pkt *p,
						 const struct lb_ct_value *e)
{
	f->backend = p->saddr;
	f->backend_port = p->sport;
	f->nat_addr = p->daddr;
	f->nat_port = p->dport;
	f->client = e->nat_addr;
	f->client_port = e->nat_port;
	f->vip = e->addr;
	f->vip_port = e->port;
	f->proto = p->proto;
	f->flags = e->flags;
	f->svc_gen = e->svc_gen;
	f->svc_id = e->svc_id;
	f->backend_id = e->backend_id;
	f->map_gen = e->map_gen;
}

/* After a reply refreshed its reverse entry: refresh the forward entry too if
 * it still belongs to this backend, recreate it if it was evicted, leave it
 * alone if the flow has moved to another backend meanwhile. */
static __always_inline int ct_refresh_from_reverse(struct lb_ct_value *e, const struct lb_flow *f,
						   __u64 now)
{
	struct lb_ct_key k;
	struct lb_ct_value *fwd;

	e->last_seen = now;
	e->flags = f->flags;
	e->lifetime = ct_lifetime(f->proto, f->flags);

	ct_forward_key(&k, f);
	fwd = conntrack.lookup(&k);
	if (!fwd)
		return ct_write(f, now);
	if (fwd->backend_id == f->backend_id && fwd->svc_id == f->svc_id) {
		__u8 flags = fwd->flags | f->flags;

		fwd->last_seen = now;
		fwd->flags = flags;
		fwd->lifetime = ct_lifetime(f->proto, flags);
		e->flags = flags;
		e->lifetime = fwd->lifetime;
	}
	return 0;
}

#endif /* LB_CONNTRACK_H */
