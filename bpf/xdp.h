/* Doing what the decisions of flow.h say, in XDP: rewrites with direct packet
 * access and checksums updated by hand, our own routing by XDP_TX.
 *
 * What XDP cannot finish it leaves untouched (XDP_PASS) for the tc program
 * on the same interface, which runs the same lookups (a conntrack hit by
 * then) with the means XDP lacks; xdp_pass_to_tc counts these:
 *  - the next hop has no neighbour entry: tc's bpf_redirect_neigh resolves it;
 *  - the packet must be transmitted by us and its L4 checksum is partial (a
 *    veth: the sender's offload is still pending, which only the skb knows;
 *    an XDP_TX frame arrives as a new skb whose checksum is verified);
 *  - the interface cannot transmit XDP frames (LB_IF_F_NO_XDP_TX), or the
 *    FIB says another interface (XDP_REDIRECT needs the target's XDP
 *    support, tc's redirect does not);
 *  - the FIB lookup failed otherwise (tc drops it and counts fib_fail);
 *  - a refusal does not fit (XDP could not grow the packet).
 */
#ifndef LB_XDP_H
#define LB_XDP_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "counters.h"
#include "csum.h"
#include "fib.h"
#include "flow.h"
#include "hook.h"
#include "node.h"
#include "parse.h"
#include "reply.h"

/* What the packet's L4 checksum field holds. */
enum lb_l4_csum {
	LB_CSUM_FULL,	 /* a complete checksum: updated incrementally */
	LB_CSUM_NONE,	 /* UDP without checksum (0): stays 0 */
	LB_CSUM_PARTIAL, /* the pseudo header's sum: offload pending (CHECKSUM_PARTIAL) */
};

static __always_inline int lb_xdp_to_tc(struct lb_counters *c)
{
	LB_COUNT(c, xdp_pass_to_tc);
	return XDP_PASS;
}

/* The TCP/UDP header, NULL if it is not whole in the packet (parse made sure it is). */
static __always_inline void *lb_xdp_l4(void *data, void *end, const struct lb_pkt *p)
{
	__u32 off = p->l4_off;
	void *l4;

	if (off > LB_L3_OFF + 60)
		return NULL;
	l4 = data + off;
	if (p->proto == IPPROTO_TCP) {
		if (l4 + sizeof(struct tcphdr) > end)
			return NULL;
	} else if (l4 + sizeof(struct udphdr) > end) {
		return NULL;
	}
	return l4;
}

static __always_inline __sum16 *lb_xdp_l4_check(void *l4, const struct lb_pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return &((struct tcphdr *)l4)->check;
	return &((struct udphdr *)l4)->check;
}

/* A partial checksum is the pseudo header's sum exactly; a complete one
 * equals that by chance once in 65536 packets, which then merely take the
 * slower way (tc). Only looked for where partial checksums can arrive. */
static __always_inline int lb_xdp_l4_csum(struct xdp_md *ctx, const struct lb_pkt *p,
					  __u32 ifflags)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l4 = lb_xdp_l4(data, end, p);
	__sum16 check;

	if (!l4)
		return -1;
	check = *lb_xdp_l4_check(l4, p);
	if (p->proto == IPPROTO_UDP && check == 0)
		return LB_CSUM_NONE;
	if ((ifflags & LB_IF_F_PARTIAL_CSUM) &&
	    check == lb_csum_seed(p->saddr, p->daddr, p->proto, p->l4_len))
		return LB_CSUM_PARTIAL;
	return LB_CSUM_FULL;
}

/* Rewrite the 4-tuple in place. A partial checksum gets the new pseudo
 * header's sum (the skb stays CHECKSUM_PARTIAL after XDP_PASS); fields that
 * do not change are not touched. */
static __always_inline int lb_xdp_rewrite(struct xdp_md *ctx, const struct lb_pkt *p,
					  const struct lb_nat *n, int csum)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + LB_L3_OFF;
	void *l4 = lb_xdp_l4(data, end, p);
	__be16 *ports = l4;
	__sum16 *check;
	__u64 sum;

	if ((void *)(ip + 1) > end || !l4)
		return -1;
	check = lb_xdp_l4_check(l4, p);
	if (csum == LB_CSUM_FULL) {
		sum = (__u16)~*check;
		if (ip->saddr != n->saddr)
			sum = lb_csum_replace32(sum, ip->saddr, n->saddr);
		if (ip->daddr != n->daddr)
			sum = lb_csum_replace32(sum, ip->daddr, n->daddr);
		if (ports[0] != n->sport)
			sum = lb_csum_replace16(sum, ports[0], n->sport);
		if (ports[1] != n->dport)
			sum = lb_csum_replace16(sum, ports[1], n->dport);
		*check = lb_csum_finish(sum);
		if (p->proto == IPPROTO_UDP && *check == 0)
			*check = 0xffff; /* 0 would mean "no checksum" */
	} else if (csum == LB_CSUM_PARTIAL) {
		*check = lb_csum_seed(n->saddr, n->daddr, p->proto, p->l4_len);
	}

	sum = (__u16)~ip->check;
	if (ip->saddr != n->saddr)
		sum = lb_csum_replace32(sum, ip->saddr, n->saddr);
	if (ip->daddr != n->daddr)
		sum = lb_csum_replace32(sum, ip->daddr, n->daddr);
	ip->check = lb_csum_finish(sum);
	ip->saddr = n->saddr;
	ip->daddr = n->daddr;
	ports[0] = n->sport;
	ports[1] = n->dport;
	return 0;
}

static __always_inline int lb_xdp_set_macs(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return 0;
}

static __always_inline int lb_xdp_nat(struct xdp_md *ctx, const struct lb_pkt *p,
				      const struct lb_nat *n, const struct lb_node_config *cfg,
				      struct lb_counters *c)
{
	__u32 ifflags = lb_iface_flags(cfg, ctx->ingress_ifindex);
	struct bpf_fib_lookup fib = {};
	int csum = lb_xdp_l4_csum(ctx, p, ifflags);

	if (csum < 0)
		return lb_xdp_to_tc(c);
	if (n->route != LB_ROUTE_STACK) {
		/* Ours to transmit: everything is checked before the first write. */
		if (n->route != LB_ROUTE_FIB || csum == LB_CSUM_PARTIAL ||
		    (ifflags & LB_IF_F_NO_XDP_TX))
			return lb_xdp_to_tc(c);
		lb_fib_params(&fib, p, n, ctx->ingress_ifindex, lb_ip_len(p));
		if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
		    fib.ifindex != ctx->ingress_ifindex)
			return lb_xdp_to_tc(c);
	}
	if (lb_xdp_rewrite(ctx, p, n, csum))
		return lb_xdp_to_tc(c); /* headers not whole: unreachable after parsing */
	lb_count_nat(c, n);
	LB_COUNT(c, nodeport_xdp);
	if (n->route == LB_ROUTE_STACK)
		return XDP_PASS;
	if (lb_xdp_set_macs(ctx, &fib)) {
		LB_COUNT(c, errors);
		return XDP_DROP;
	}
	LB_COUNT(c, fib_redirect);
	return XDP_TX;
}

/* The verdict for a decision of flow.h. */
static __always_inline int lb_xdp_act(struct xdp_md *ctx, int act, const struct lb_pkt *p,
				      const struct lb_nat *n, const struct lb_node_config *cfg,
				      struct lb_counters *c)
{
	int verdict;

	if (act == LB_ACT_NAT)
		return lb_xdp_nat(ctx, p, n, cfg, c);
	if (act == LB_ACT_REFUSE) {
		if (lb_iface_flags(cfg, ctx->ingress_ifindex) & LB_IF_F_NO_XDP_TX)
			return lb_xdp_to_tc(c);
		verdict = lb_refuse(ctx, LB_HOOK_XDP, p, c);
		if (verdict == LB_REFUSE_TO_TC)
			return lb_xdp_to_tc(c);
		if (verdict == XDP_TX)
			LB_COUNT(c, nodeport_xdp);
		return verdict;
	}
	if (act == LB_ACT_DROP)
		return XDP_DROP;
	return XDP_PASS;
}

#endif /* LB_XDP_H */
