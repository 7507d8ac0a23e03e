/* Checksums: folding, checksums of headers we build, and where the L4
 * checksum of a packet lives and how it must be updated.
 */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "lb_config.h"
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

/* skb->ip_summed's values (linux/skbuff.h). */
#define LB_CHECKSUM_NONE 0
#define LB_CHECKSUM_UNNECESSARY 1
#define LB_CHECKSUM_COMPLETE 2
#define LB_CHECKSUM_PARTIAL 3
#define LB_CHECKSUM_UNKNOWN -1

/* The skb's checksum state, or LB_CHECKSUM_UNKNOWN. struct __sk_buff does not show it;
 * the kfunc bpf_cast_to_kern_ctx gives the struct sk_buff behind it (the verifier turns
 * the call into a register move), whose ip_summed is 2 bits of one byte. bcc 0.26 cannot
 * emit a kfunc call, so the program calls a helper number no helper has
 * (LB_KFUNC_KERN_CTX_CALL), which the compiler child turns into the kfunc call before
 * loading, with the kfunc's BTF id (ebpflb/datapath/compile.py); the loader reads that id
 * and where ip_summed lies from the kernel's BTF (ebpflb/datapath/kbtf.py), and only then
 * defines LB_SKB_IP_SUMMED_OFF. */
#ifdef LB_SKB_IP_SUMMED_OFF
static void *(*lb_cast_to_kern_ctx)(void *ctx) = (void *)LB_KFUNC_KERN_CTX_CALL;

static __always_inline int lb_skb_ip_summed(struct __sk_buff *skb)
{
	void *kskb = lb_cast_to_kern_ctx(skb);
	__u64 byte;

	/* A load the verifier checks against struct sk_buff's BTF, kept from bcc's rewriter. */
	asm volatile("%[byte] = *(u8 *)(%[kskb] + %[off])"
		     : [byte] "=r"(byte)
		     : [kskb] "r"(kskb), [off] "i"(LB_SKB_IP_SUMMED_OFF));
	return (byte >> LB_SKB_IP_SUMMED_SHIFT) & 3;
}
#else
static __always_inline int lb_skb_ip_summed(struct __sk_buff *skb)
{
	return LB_CHECKSUM_UNKNOWN;
}
#endif

/* -- Incremental updates done by hand (XDP has no checksum helpers) ------
 *
 * One's complement sums of 16-bit words do not depend on byte order as long
 * as every word is read the same way, so addresses and ports are summed as
 * they lie in memory (wire order) and the result is stored the same way. */

/* Fold a sum of 16-bit words to 16 bits (end-around carry), not complemented. */
static __always_inline __u16 lb_csum_fold16(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u64 lb_csum_add32(__u64 sum, __be32 v)
{
	return sum + (v & 0xffff) + (v >> 16);
}

/* RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'): start from ~HC, then for every
 * changed field add ~m + m', then lb_csum_finish. */
static __always_inline __u64 lb_csum_replace32(__u64 sum, __be32 from, __be32 to)
{
	return lb_csum_add32(sum, ~from) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u64 lb_csum_replace16(__u64 sum, __be16 from, __be16 to)
{
	return sum + (__u16)~from + to;
}

static __always_inline __sum16 lb_csum_finish(__u64 sum)
{
	return (__sum16)~lb_csum_fold16(sum);
}

/* What a TCP/UDP checksum field holds while the sender's checksum offload is
 * still pending (CHECKSUM_PARTIAL): the pseudo header's sum, folded, not
 * complemented; the device adds the segment and complements. */
static __always_inline __sum16 lb_csum_seed(__be32 saddr, __be32 daddr, __u8 proto, __u32 len)
{
	__u64 sum = lb_csum_add32(0, saddr);

	sum = lb_csum_add32(sum, daddr);
	return (__sum16)lb_csum_fold16(sum + lb_htons(proto) + lb_htons(len));
}

#endif /* LB_CSUM_H */
