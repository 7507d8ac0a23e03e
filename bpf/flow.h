/* Per-packet handling of the two directions of a balanced connection:
 * client -> VIP (DNAT to a backend) and backend -> client (reverse NAT).
 */
#ifndef LB_FLOW_H
#define LB_FLOW_H

#include <linux/pkt_cls.h>

#include "conntrack.h"
#include "counters.h"
#include "lb.h"
#include "lb_maps.h"
#include "nat.h"
#include "parse.h"
#include "reply.h"

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

/* Point the flow at a freshly selected backend. */
static __always_inline void lb_flow_set_backend(struct lb_flow *f, const struct lb_backend_value *b,
						__u32 backend_id)
{
	f->backend = b->addr;
	f->backend_port = b->port;
	f->backend_id = backend_id;
	if (b->addr == f->client)
		f->flags |= LB_CT_F_HAIRPIN;
	else
		f->flags &= ~LB_CT_F_HAIRPIN;
}

/* Send the packet back out of the interface it came in on. A hairpinned
 * packet goes back to the pod it came from: swapping the MACs makes the
 * destination the pod and the source the gateway (whose MAC it was sent to),
 * and skips the node's routing and reverse-path filter, which would drop the
 * link-local hairpin source. */
static __always_inline int lb_bounce(struct __sk_buff *skb, struct lb_counters *c)
{
	if (lb_swap_macs(skb)) {
		LB_COUNT(c, errors);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* Not a TC action: the helper is done, the caller goes on. */
#define LB_CONTINUE (-2)

/* Remember the flow (both conntrack entries). */
static __always_inline int lb_flow_save(const struct lb_flow *f, __u64 now, struct lb_counters *c)
{
	if (ct_write(f, now))
		LB_COUNT(c, errors); /* forwarded anyway: its replies will not be reverse-NATed */
	return LB_CONTINUE;
}

/* The flow of a client's packet: its conntrack entry if usable (moved at once
 * off a backend that left the service), else a newly balanced one. Fills f;
 * returns LB_CONTINUE, or the verdict for a client that is refused. */
static __always_inline int lb_forward_flow(struct __sk_buff *skb, const struct lb_pkt *p,
					   const struct lb_svc_value *svc, struct lb_flow *f,
					   __u64 now, struct lb_counters *c)
{
	struct lb_backend_value *b;
	struct lb_ct_key key;
	struct lb_ct_value *e;
	__u32 backend_id = 0;
	__u8 flags;

	ct_forward_key(&key, f);
	e = conntrack.lookup(&key);
	if (e && lb_ct_usable(e, svc, p, now, c)) {
		LB_COUNT(c, ct_hits);
		ct_flow_from_forward(f, p, e);
		flags = ct_next_flags(f->flags, p, 1);
		b = lb_backend_in_service(svc->svc_id, e->backend_id);
		if (b && b->addr == e->addr && b->port == e->port) {
			if (!ct_needs_refresh(e, flags, now))
				return LB_CONTINUE;
			f->flags = flags;
			if (lb_svc_has_affinity(svc))
				lb_affinity_touch(svc, f->client, f->backend_id, now);
			return lb_flow_save(f, now, c);
		}
		/* The backend left the service (or its id now names another
		 * endpoint): move the flow now. TCP: the new backend answers the
		 * next segment with a RST, so the client learns at once. */
		LB_COUNT(c, reselects);
		ct_delete_reverse(f);
	} else {
		LB_COUNT(c, ct_misses);
		if (e) {
			/* A dead entry is replaced: its reply entry goes too. */
			struct lb_flow old = {};

			ct_flow_from_forward(&old, p, e);
			ct_delete_reverse(&old);
		}
		flags = ct_next_flags(0, p, 1);
	}

	b = lb_select_backend(svc, p, now, &backend_id, c);
	if (!b)
		return lb_refuse(skb, p, c);
	f->flags = flags;
	lb_flow_set_backend(f, b, backend_id);
	return lb_flow_save(f, now, c);
}

/* client -> VIP: find or make the flow, DNAT it (and SNAT when hairpinning). */
static __always_inline int lb_forward(struct __sk_buff *skb, const struct lb_pkt *p,
				      const struct lb_svc_value *svc, struct lb_counters *c)
{
	struct lb_flow f = {
		.client = p->saddr, .vip = p->daddr, .client_port = p->sport,
		.vip_port = p->dport, .proto = p->proto, .svc_id = svc->svc_id,
	};
	int ret = lb_forward_flow(skb, p, svc, &f, lb_now(), c);

	if (ret != LB_CONTINUE)
		return ret;
	if (lb_rewrite(skb, p, ct_is_hairpin(&f) ? LB_HAIRPIN_IP : p->saddr, f.backend, p->sport,
		       f.backend_port)) {
		LB_COUNT(c, errors);
		return TC_ACT_SHOT;
	}
	LB_COUNT(c, dnat);
	if (ct_is_hairpin(&f)) {
		LB_COUNT(c, hairpin);
		return lb_bounce(skb, c);
	}
	return TC_ACT_OK;
}

/* backend -> client: if this is the reply of a balanced flow, write the VIP
 * back as its source (and the client as destination when hairpinning). */
static __always_inline int lb_reverse(struct __sk_buff *skb, const struct lb_pkt *p,
				      struct lb_counters *c)
{
	struct lb_ct_key key = {
		.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
		.proto = p->proto, .dir = LB_CT_REVERSE, .pad = 0,
	};
	struct lb_ct_value *e = conntrack.lookup(&key);
	struct lb_flow f = {};
	__u64 now;
	__u8 flags;

	if (!e) {
		LB_COUNT(c, passed);
		return TC_ACT_OK;
	}
	now = lb_now();
	if (ct_expired(e, now)) {
		LB_COUNT(c, passed);
		return TC_ACT_OK;
	}
	ct_flow_from_reverse(&f, p, e);
	flags = ct_next_flags(f.flags, p, 0);
	if (ct_needs_refresh(e, flags, now)) {
		f.flags = flags;
		if (ct_refresh_from_reverse(e, &f, now))
			LB_COUNT(c, errors);
	}

	if (lb_rewrite(skb, p, f.vip, f.client, f.vip_port, p->dport)) {
		LB_COUNT(c, errors);
		return TC_ACT_SHOT;
	}
	LB_COUNT(c, rev_nat);
	if (ct_is_hairpin(&f)) {
		LB_COUNT(c, hairpin);
		return lb_bounce(skb, c);
	}
	return TC_ACT_OK;
}

#endif /* LB_FLOW_H */
