/* Routing a packet ourselves: a FIB lookup for its (rewritten) addresses,
 * then the egress interface and the MAC addresses the kernel would use.
 *
 * Needed whenever the packet's new source is one of the node's addresses
 * (SNATed to the node, or a reply that now comes from a NodePort): the
 * kernel's input routing would drop it as a martian source.
 */
#ifndef LB_FIB_H
#define LB_FIB_H

#include <linux/if_ether.h>
#include <linux/socket.h>

#include "flow.h"
#include "parse.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* bcc 0.26 declares the helper's first, 3-argument form (Linux 5.10); 5.11
 * added the next-hop parameters used here. */
static long (*lb_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				 __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* Lookup parameters for the rewritten packet, as if it had come in on
 * ifindex. tot_len 0 (tc): the kernel checks the skb against the egress MTU
 * itself, GSO included. */
static __always_inline void lb_fib_params(struct bpf_fib_lookup *fib, const struct lb_pkt *p,
					  const struct lb_nat *n, __u32 ifindex, __u16 tot_len)
{
	fib->family = AF_INET;
	fib->l4_protocol = p->proto;
	fib->sport = n->sport;
	fib->dport = n->dport;
	fib->tot_len = tot_len;
	fib->ifindex = ifindex;
	fib->ipv4_src = n->saddr;
	fib->ipv4_dst = n->daddr;
}

/* tc: send the rewritten packet out of the FIB's egress interface. A missing
 * neighbour entry is resolved by bpf_redirect_neigh (the packet waits for
 * ARP like any other); any other failure drops the packet. */
static __always_inline int lb_tc_route(struct __sk_buff *skb, const struct lb_pkt *p,
				       const struct lb_nat *n, struct lb_counters *c)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	lb_fib_params(&fib, p, n, skb->ifindex, 0);
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		struct ethhdr *eth = (void *)(long)skb->data;

		if ((void *)(eth + 1) > (void *)(long)skb->data_end) {
			LB_COUNT(c, errors);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
		LB_COUNT(c, fib_redirect);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* fib.ipv4_dst is the next hop now (the gateway, or the destination). */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst };

		LB_COUNT(c, fib_redirect_neigh);
		return lb_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	LB_COUNT(c, fib_fail);
	return TC_ACT_SHOT;
}

#endif /* LB_FIB_H */
