/* tc: rewriting addresses and ports in place through helpers, keeping the
 * IP and L4 checksums right (incrementally, and the helpers know whether the
 * skb's checksum is partial, so CHECKSUM_PARTIAL GSO skbs stay valid). XDP's
 * counterpart is in xdp.h.
 */
#ifndef LB_NAT_H
#define LB_NAT_H

#include <linux/if_ether.h>
#include <linux/ip.h>

#include "csum.h"
#include "parse.h"

/* Replace the IPv4 address at ip_field (offsetof in struct iphdr). An address
 * is in the TCP/UDP pseudo header: BPF_F_PSEUDO_HDR makes the helper update a
 * partial (pseudo-header only) checksum as well as a full one. */
static __always_inline int lb_rewrite_addr(struct __sk_buff *skb, const struct lb_pkt *p,
					   __u32 ip_field, __be32 from, __be32 to)
{
	if (from == to)
		return 0;
	if (bpf_l4_csum_replace(skb, lb_l4_csum_off(p), from, to,
				BPF_F_PSEUDO_HDR | lb_l4_csum_flags(p) | sizeof(to)))
		return -1;
	if (bpf_l3_csum_replace(skb, LB_L3_OFF + offsetof(struct iphdr, check), from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, LB_L3_OFF + ip_field, &to, sizeof(to), 0);
}

/* Replace the port at l4_field (0: source, 2: destination). Ports are not in
 * the pseudo header: no BPF_F_PSEUDO_HDR, so a partial checksum is left
 * alone (the device sums the new port itself). */
static __always_inline int lb_rewrite_port(struct __sk_buff *skb, const struct lb_pkt *p,
					   __u32 l4_field, __be16 from, __be16 to)
{
	if (from == to)
		return 0;
	if (bpf_l4_csum_replace(skb, lb_l4_csum_off(p), from, to, lb_l4_csum_flags(p) | sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + l4_field, &to, sizeof(to), 0);
}

/* Rewrite the packet's 4-tuple to (saddr, daddr, sport, dport); fields that
 * do not change are not touched. Returns 0 or a negative error. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, const struct lb_pkt *p, __be32 saddr,
				      __be32 daddr, __be16 sport, __be16 dport)
{
	if (lb_rewrite_addr(skb, p, offsetof(struct iphdr, saddr), p->saddr, saddr) ||
	    lb_rewrite_addr(skb, p, offsetof(struct iphdr, daddr), p->daddr, daddr) ||
	    lb_rewrite_port(skb, p, 0, p->sport, sport) || lb_rewrite_port(skb, p, 2, p->dport, dport))
		return -1;
	return 0;
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
