/* Checksums: folding, checksums of headers we build, and where the L4
 * checksum of a packet lives and how it must be updated.
 */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "parse.h"

/* Fold a 32-bit one's complement sum (as bpf_csum_diff returns) to 16 bits
 * and complement it: the value to store in a checksum field. */
static __always_inline __sum16 lb_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__sum16)~s;
}

/* IPv4 header checksum of a 20-byte header whose check field is 0. */
static __always_inline __sum16 lb_csum_ipv4_hdr(struct iphdr *ip)
{
	return lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* The pseudo header of TCP and UDP checksums. */
struct lb_pseudo_hdr {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len; /* L4 header + payload */
};

/* Unfolded sum of the pseudo header, to seed a TCP checksum. */
static __always_inline __s64 lb_csum_pseudo(__be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
	struct lb_pseudo_hdr ph = {
		.saddr = saddr, .daddr = daddr, .zero = 0, .proto = proto, .len = lb_htons(len),
	};
	return bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
}

/* Offset of the packet's L4 checksum field. */
static __always_inline __u32 lb_l4_csum_off(const struct lb_pkt *p)
{
	return p->l4_off +
	       (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
}

/* Flags for bpf_l4_csum_replace besides the size: UDP's checksum 0 means
 * "none" and must stay 0, and a result of 0 must be written as 0xffff. */
static __always_inline __u64 lb_l4_csum_flags(const struct lb_pkt *p)
{
	return p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

#endif /* LB_CSUM_H */
