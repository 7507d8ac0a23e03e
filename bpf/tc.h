/* Doing what the decisions of flow.h say, in a tc program: rewrites through
 * helpers (which know whether the skb's checksum is partial), then the
 * kernel, a bounce, or our own routing.
 */
#ifndef LB_TC_H
#define LB_TC_H

#include <linux/pkt_cls.h>

#include "counters.h"
#include "fib.h"
#include "flow.h"
#include "hook.h"
#include "nat.h"
#include "parse.h"
#include "reply.h"

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

static __always_inline int lb_tc_nat(struct __sk_buff *skb, const struct lb_pkt *p,
				     const struct lb_nat *n, struct lb_counters *c)
{
	if (lb_rewrite(skb, p, n)) {
		LB_COUNT(c, errors);
		return TC_ACT_SHOT;
	}
	lb_count_nat(c, n);
	if (n->route == LB_ROUTE_BOUNCE)
		return lb_bounce(skb, c);
	if (n->route == LB_ROUTE_FIB)
		return lb_tc_route(skb, p, n, c);
	return TC_ACT_OK;
}

/* The verdict for a decision of flow.h. */
static __always_inline int lb_tc_act(struct __sk_buff *skb, int act, const struct lb_pkt *p,
				     const struct lb_nat *n, struct lb_counters *c)
{
	if (act == LB_ACT_NAT)
		return lb_tc_nat(skb, p, n, c);
	if (act == LB_ACT_REFUSE)
		return lb_refuse(skb, LB_HOOK_TC, p, c);
	if (act == LB_ACT_DROP)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

#endif /* LB_TC_H */
