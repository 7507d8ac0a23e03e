/* Refusing a client when its frontend has no backend: the packet is turned
 * into a TCP RST or an ICMP port unreachable from the VIP and sent back out
 * of the interface it came in on (towards the pod, or the external client),
 * so the client fails at once instead of timing out.
 *
 * Both replies are built whole on the stack with full checksums (but see
 * lb_rst_keeps_partial_csum()), the packet is cut or grown to their length, and
 * written over the original: in tc and in XDP alike.
 */
#ifndef LB_REPLY_H
#define LB_REPLY_H

#include <linux/if_ether.h>
#include <linux/icmp.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

#include "counters.h"
#include "csum.h"
#include "hook.h"
#include "parse.h"

#define LB_REPLY_TTL 64
#define LB_IP_DF 0x4000
#define LB_ICMP_QUOTE_MAX (60 + 8) /* the largest IP header + 8 bytes */

/* The 2-byte pad puts the IP header on a 4-byte boundary: no packed struct,
 * no compiler padding. What goes on the wire starts at .eth. */
struct lb_rst_frame {
	__u16 pad;
	struct ethhdr eth;
	struct iphdr ip;
	struct tcphdr tcp;
};

struct lb_icmp_frame {
	__u16 pad;
	struct ethhdr eth;
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[LB_ICMP_QUOTE_MAX]; /* the original IP header and first 8 bytes of L4 */
};

/* Ethernet header for a frame going back to the sender. */
static __always_inline int lb_reply_eth(void *ctx, const enum lb_hook hook, struct ethhdr *eth)
{
	struct ethhdr in;

	if (lb_load_bytes(ctx, hook, 0, &in, sizeof(in)))
		return -1;
	__builtin_memcpy(eth->h_dest, in.h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, in.h_dest, ETH_ALEN);
	eth->h_proto = in.h_proto;
	return 0;
}

/* IPv4 header from the VIP back to the client, checksum included. */
static __always_inline void lb_reply_ip(struct iphdr *ip, const struct lb_pkt *p, __u8 proto,
					__u16 tot_len, __be16 frag_off)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = lb_htons(tot_len);
	ip->id = 0;
	ip->frag_off = frag_off;
	ip->ttl = LB_REPLY_TTL;
	ip->protocol = proto;
	ip->check = 0;
	ip->saddr = p->daddr;
	ip->daddr = p->saddr;
	ip->check = lb_csum_ipv4_hdr(ip);
}

/* The RST written over the client's segment stays a CHECKSUM_PARTIAL skb if the segment
 * was one (a pod's, with checksum offload): the kernel or device that sends it on sums
 * the TCP header from the segment's csum_start into its check field, which must then
 * hold the pseudo header's seed, not a full checksum (that would come out wrong where the
 * checksum is finished in software: a device without checksum offload). The RST's TCP
 * header starts where the segment's did unless the segment had IP options; then, and
 * where the state cannot be read, the RST gets a full checksum. (An ICMP reply needs no
 * such care: a whole checksum over the message, with 0 in the bytes where the UDP
 * checksum was, is what finishing it computes.) */
static __always_inline int lb_rst_keeps_partial_csum(void *ctx, const enum lb_hook hook,
						     const struct lb_pkt *p)
{
	if (hook != LB_HOOK_TC || p->l4_off != LB_L3_OFF + sizeof(struct iphdr))
		return 0;
	return lb_skb_ip_summed(ctx) == LB_CHECKSUM_PARTIAL;
}

/* RFC 9293 3.10.7.1 (closed port): a segment with ACK gets <SEQ=SEG.ACK><CTL=RST>,
 * one without gets <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK> (SYN and FIN
 * count in SEG.LEN). */
static __always_inline int lb_reply_tcp_rst(void *ctx, const enum lb_hook hook,
					    const struct lb_pkt *p)
{
	struct lb_rst_frame f = {};
	struct tcphdr in;
	__u32 seg_len;
	__s64 sum;

	if (lb_reply_eth(ctx, hook, &f.eth) ||
	    lb_load_bytes(ctx, hook, p->l4_off, &in, sizeof(in)))
		return -1;
	lb_reply_ip(&f.ip, p, IPPROTO_TCP, sizeof(f.ip) + sizeof(f.tcp), lb_htons(LB_IP_DF));

	f.tcp.source = p->dport;
	f.tcp.dest = p->sport;
	f.tcp.doff = sizeof(f.tcp) / 4;
	f.tcp.rst = 1;
	if (p->tcp_flags & LB_TCP_ACK) {
		f.tcp.seq = in.ack_seq;
	} else {
		seg_len = p->l4_len - p->l4_hlen;
		if (p->tcp_flags & LB_TCP_SYN)
			seg_len++;
		if (p->tcp_flags & LB_TCP_FIN)
			seg_len++;
		f.tcp.ack_seq = lb_htonl(lb_ntohl(in.seq) + seg_len);
		f.tcp.ack = 1;
	}
	if (lb_rst_keeps_partial_csum(ctx, hook, p)) {
		f.tcp.check = lb_csum_seed(f.ip.saddr, f.ip.daddr, IPPROTO_TCP, sizeof(f.tcp));
	} else {
		sum = lb_csum_pseudo(f.ip.saddr, f.ip.daddr, IPPROTO_TCP, sizeof(f.tcp));
		f.tcp.check = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&f.tcp, sizeof(f.tcp), sum));
	}

	if (lb_set_len(ctx, hook, sizeof(f) - sizeof(f.pad)))
		return -1;
	return lb_store_bytes(ctx, hook, 0, &f.eth, sizeof(f) - sizeof(f.pad)) ? -2 : 0;
}

/* RFC 792 destination unreachable, code 3 (port unreachable), quoting the
 * client's IP header (options included) and the first 8 bytes after it. */
static __always_inline int lb_reply_icmp_unreach(void *ctx, const enum lb_hook hook,
						 const struct lb_pkt *p)
{
	struct lb_icmp_frame f = {};
	__u32 quote_len = p->l4_off - LB_L3_OFF + 8;
	__u32 len;
	__s64 sum;

	if (quote_len < sizeof(struct iphdr) + 8 || quote_len > sizeof(f.quote))
		return -1;
	if (lb_reply_eth(ctx, hook, &f.eth) ||
	    lb_load_bytes(ctx, hook, LB_L3_OFF, f.quote, quote_len))
		return -1;
	lb_reply_ip(&f.ip, p, IPPROTO_ICMP, sizeof(f.ip) + sizeof(f.icmp) + quote_len, 0);

	f.icmp.type = ICMP_DEST_UNREACH;
	f.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(0, 0, (__be32 *)&f.icmp, sizeof(f.icmp), 0);
	f.icmp.checksum = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)f.quote, quote_len, sum));

	len = sizeof(f.eth) + sizeof(f.ip) + sizeof(f.icmp) + quote_len;
	if (lb_set_len(ctx, hook, len))
		return -1;
	return lb_store_bytes(ctx, hook, 0, &f.eth, len) ? -2 : 0;
}

/* The builders above return -1 while the packet is still untouched (a load
 * failed, or it could not be cut or grown), -2 once it was not. Not a
 * verdict: XDP could not build the reply and the packet is untouched, so
 * the caller hands it to tc (which can grow an skb). */
#define LB_REFUSE_TO_TC (-3)

/* The frontend has no backend: answer and send the answer back where the
 * client is, or drop what must not be answered (a RST). */
static __always_inline int lb_refuse(void *ctx, const enum lb_hook hook, const struct lb_pkt *p,
				     struct lb_counters *c)
{
	int err;

	LB_COUNT(c, no_backend);
	if (lb_tcp_has(p, LB_TCP_RST))
		return lb_drop(hook);
	if (p->proto == IPPROTO_TCP)
		err = lb_reply_tcp_rst(ctx, hook, p);
	else
		err = lb_reply_icmp_unreach(ctx, hook, p);
	if (err == -1 && hook == LB_HOOK_XDP)
		return LB_REFUSE_TO_TC; /* nothing was written yet */
	if (err) {
		LB_COUNT(c, errors);
		return lb_drop(hook);
	}
	return lb_send_back(ctx, hook);
}

#endif /* LB_REPLY_H */
