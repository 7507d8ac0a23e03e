/* tc: rewriting addresses and ports in place, keeping the IP and L4 checksums
 * right. Everything is written directly and the checksums updated by hand when
 * the program can read the skb's checksum state (ip_summed: a partial L4
 * checksum takes another update than a full one, and CHECKSUM_PARTIAL GSO skbs
 * must stay valid); else, and for CHECKSUM_COMPLETE, the L4 checksum's update
 * goes through the helper, which knows the state. XDP's counterpart is in xdp.h.
 */
#ifndef LB_NAT_H
#define LB_NAT_H

#include <linux/if_ether.h>
#include <linux/ip.h>

#include "csum.h"
#include "flow.h"
#include "parse.h"

/* The changed words of the rewrite, summed for an incremental checksum update (RFC 1624
 * eqn. 3: ~m + m' for every changed field; lb_csum_replace* in csum.h). */
struct lb_csum_diff {
	__u64 addrs; /* the addresses: in the IP header and in the TCP/UDP pseudo header */
	__u64 ports; /* the ports: in the TCP/UDP header only */
};

/* Update the L4 checksum by hand, as the helper would (inet_proto_csum_replace_by_diff()
 * and BPF_F_MARK_MANGLED_0 for UDP): a full checksum (NONE, UNNECESSARY) takes the change
 * of addresses and ports; a partial one (PARTIAL: the field holds the pseudo header's sum,
 * not complemented, and the device sums the segment) takes the addresses' only. A UDP
 * checksum 0 ("none") stays 0, and a result of 0 is written as 0xffff. */
static __always_inline int lb_l4_csum_by_hand(struct __sk_buff *skb, const struct lb_pkt *p,
					      const struct lb_csum_diff *d, int summed)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 off = lb_l4_csum_off(p);
	__sum16 *check;
	__u16 v;

	if (off > LB_L3_OFF + 60 + offsetof(struct tcphdr, check))
		return -1;
	check = data + off;
	if ((void *)(check + 1) > end)
		return -1;
	v = *check;
	if (p->proto == IPPROTO_UDP && !v)
		return 0;
	if (summed == LB_CHECKSUM_PARTIAL)
		v = lb_csum_fold16(v + d->addrs);
	else
		v = lb_csum_finish((__u16)~v + d->addrs + d->ports);
	if (p->proto == IPPROTO_UDP && !v)
		v = 0xffff;
	*check = v;
	return 0;
}

/* Apply one part of the L4 checksum's change through the helper, which alone knows the
 * skb's checksum state: a partial checksum (CHECKSUM_PARTIAL: the field holds the pseudo
 * header's sum) takes the change only with BPF_F_PSEUDO_HDR (the device sums the new
 * ports itself), a full one takes both, and CHECKSUM_COMPLETE's skb->csum follows the
 * pseudo header's part. Size 0: "to" is the folded difference itself. */
static __always_inline int lb_l4_csum_diff(struct __sk_buff *skb, const struct lb_pkt *p,
					   __u64 diff, __u64 flags)
{
	if (!diff)
		return 0;
	return bpf_l4_csum_replace(skb, lb_l4_csum_off(p), 0, lb_csum_fold16(diff),
				   flags | lb_l4_csum_flags(p));
}

/* Rewrite the packet's 4-tuple to n's, in place: the addresses, the IP checksum and the
 * ports written directly (the headers are in the linear part: lb_parse pulled them),
 * then the L4 checksum, by hand if the skb's checksum state is known and not COMPLETE,
 * else by at most two helper calls (addresses, ports), which may move the packet and
 * come last. Fields that do not change are not touched. Returns 0 or -1. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, const struct lb_pkt *p,
				      const struct lb_nat *n)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + LB_L3_OFF;
	struct lb_csum_diff d = {};
	__u32 l4_off = p->l4_off;
	__be16 *ports;
	__u64 sum;
	int summed;

	if ((void *)(ip + 1) > end || l4_off > LB_L3_OFF + 60)
		return -1;
	ports = data + l4_off;
	if ((void *)(ports + 2) > end)
		return -1;

	if (p->saddr != n->saddr)
		d.addrs = lb_csum_replace32(d.addrs, p->saddr, n->saddr);
	if (p->daddr != n->daddr)
		d.addrs = lb_csum_replace32(d.addrs, p->daddr, n->daddr);
	if (p->sport != n->sport)
		d.ports = lb_csum_replace16(d.ports, p->sport, n->sport);
	if (p->dport != n->dport)
		d.ports = lb_csum_replace16(d.ports, p->dport, n->dport);
	/* Written whenever they change: a change can sum to 0 (0xffff to 0 is no change to a
	 * one's complement sum), which only the checksums may skip. */
	if (p->saddr != n->saddr || p->daddr != n->daddr) {
		sum = (__u16)~ip->check;
		ip->check = lb_csum_finish(sum + d.addrs);
		ip->saddr = n->saddr;
		ip->daddr = n->daddr;
	}
	if (p->sport != n->sport || p->dport != n->dport) {
		ports[0] = n->sport;
		ports[1] = n->dport;
	}
	summed = lb_skb_ip_summed(skb);
	if (summed != LB_CHECKSUM_UNKNOWN && summed != LB_CHECKSUM_COMPLETE)
		return lb_l4_csum_by_hand(skb, p, &d, summed);
	if (lb_l4_csum_diff(skb, p, d.addrs, BPF_F_PSEUDO_HDR))
		return -1;
	return lb_l4_csum_diff(skb, p, d.ports, 0);
}

/* Swap the Ethernet addresses, to send a frame back where it came from. */
static __always_inline int lb_swap_macs(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, macs + ETH_ALEN, ETH_ALEN, 0))
		return -1;
	return bpf_skb_store_bytes(skb, ETH_ALEN, macs, ETH_ALEN, 0);
}

#endif /* LB_NAT_H */
