/* Packet parsing: Ethernet + IPv4 + TCP/UDP headers into a struct lb_pkt,
 * for tc and XDP alike.
 *
 * Reads only, with direct packet access; nothing here keeps a pointer for
 * later (tc changes the packet through helpers, which invalidate them).
 */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "hook.h"
#include "lb_config.h"

#define LB_L3_OFF ETH_HLEN /* veths carry no VLAN tags */

#define LB_IP_MF 0x2000	    /* more fragments */
#define LB_IP_OFFSET 0x1fff /* fragment offset (8-byte units) */

#define LB_TCP_FIN 0x01
#define LB_TCP_SYN 0x02
#define LB_TCP_RST 0x04
#define LB_TCP_ACK 0x10

enum lb_parse_result {
	LB_PARSE_OK,	    /* IPv4 TCP/UDP, unfragmented, headers complete */
	LB_PARSE_OTHER,	    /* not IPv4, or not TCP/UDP */
	LB_PARSE_FRAGMENT,  /* an IPv4 fragment */
	LB_PARSE_MALFORMED, /* truncated or inconsistent headers */
	LB_PARSE_SHORT,	    /* (within lb_parse only) a header lies past the linear part */
};

/* What the datapath needs from a packet, addresses and ports in wire order. */
struct lb_pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;	 /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 tcp_flags;	 /* TCP: flags byte (FIN, SYN, RST, PSH, ACK...); UDP: 0 */
	__u16 l4_off;	 /* offset of the TCP/UDP header: Ethernet + IHL * 4 */
	__u16 l4_hlen;	 /* TCP: data offset * 4; UDP: 8 */
	__u32 l4_len;	 /* IP total length minus the IP header: L4 header + payload */
};

/* The IP packet's length: header and L4 segment. */
static __always_inline __u32 lb_ip_len(const struct lb_pkt *p)
{
	return p->l4_off - LB_L3_OFF + p->l4_len;
}

static __always_inline int lb_tcp_has(const struct lb_pkt *p, __u8 flag)
{
	return p->proto == IPPROTO_TCP && (p->tcp_flags & flag);
}

/* A new connection's first packet: SYN without ACK. */
static __always_inline int lb_tcp_is_syn(const struct lb_pkt *p)
{
	return p->proto == IPPROTO_TCP && (p->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN;
}

/* tc: pull the headers we read into the skb's linear part, when they are not
 * there (a GSO skb whose TCP header sits in a page; the largest IP header).
 * Only then: pulling also makes the skb private (bpf_skb_pull_data copies a
 * head that the sender's TCP retransmit queue shares), which costs more than
 * the whole program for a data packet we then leave alone. XDP's headers are
 * linear. Nonzero if it failed. */
static __always_inline int lb_pull_headers(void *ctx, const enum lb_hook hook)
{
	struct __sk_buff *skb = ctx;
	__u32 want = LB_L3_OFF + 60 + sizeof(struct tcphdr);

	if (hook == LB_HOOK_XDP)
		return -1;
	if (want > skb->len)
		want = skb->len;
	return bpf_skb_pull_data(skb, want);
}

/* A GSO packet over 64 KB (BIG TCP) carries IP total length 0; its length is
 * the skb's. XDP never sees one (it is not linear). */
static __always_inline __u32 lb_big_tot_len(void *ctx, const enum lb_hook hook)
{
	struct __sk_buff *skb = ctx;

	if (hook == LB_HOOK_XDP || !skb->gso_size)
		return 0;
	return skb->len - LB_L3_OFF;
}

/* A header ends past data_end: past the packet (malformed), or only past its
 * linear part (pull and parse again). An XDP frame is linear (see lb_ends_within()). */
static __always_inline int lb_short(void *data, void *data_end, __u32 len,
				    const enum lb_hook hook)
{
	if (hook == LB_HOOK_XDP)
		return LB_PARSE_MALFORMED;
	return (__u32)(data_end - data) < len ? LB_PARSE_SHORT : LB_PARSE_MALFORMED;
}

/* The packet holds off bytes from data: len says so for an skb (its paged part
 * included); an XDP frame is all between data and data_end, because the programs are
 * not loaded as frags-aware (BPF_F_XDP_HAS_FRAGS), so the kernel never hands them a
 * multi-buffer frame (generic XDP linearizes the skb first). That spares XDP the helper
 * call bpf_xdp_get_buff_len() in every parse. */
static __always_inline int lb_ends_within(void *ctx, const enum lb_hook hook, void *data,
					  void *data_end, __u32 off)
{
	if (hook == LB_HOOK_XDP)
		return off <= LB_L3_OFF + 0xffff && data + off <= data_end;
	return off <= ((struct __sk_buff *)ctx)->len;
}

/* Parse an Ethernet frame. Fragments are passed on unchanged because only the
 * first one carries the ports: translating it alone would split the datagram
 * between two destinations, and later fragments cannot be matched to a flow
 * without reassembly. A fragmented datagram to a VIP is therefore not load
 * balanced (it goes on to the VIP and is lost). */
static __always_inline int lb_parse_headers(void *ctx, const enum lb_hook hook,
					    struct lb_pkt *p)
{
	void *data = lb_data(ctx, hook);
	void *data_end = lb_data_end(ctx, hook);
	__u32 len = hook == LB_HOOK_XDP ? 0 : lb_len(ctx, hook); /* XDP: lb_ends_within() */
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return lb_short(data, data_end, len, hook);
	if (eth->h_proto != lb_htons(ETH_P_IP))
		return LB_PARSE_OTHER;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return lb_short(data, data_end, len, hook);
	if (ip->version != 4 || ip->ihl < 5)
		return LB_PARSE_MALFORMED;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return LB_PARSE_OTHER;

	__u32 ihl = ip->ihl * 4;
	__u32 tot = lb_ntohs(ip->tot_len);
	if (tot == 0)
		tot = lb_big_tot_len(ctx, hook);
	/* Compare with the packet's length, not data_end: a GSO skb's payload is in pages. */
	if (tot < ihl || !lb_ends_within(ctx, hook, data, data_end, LB_L3_OFF + tot))
		return LB_PARSE_MALFORMED;
	if (ip->frag_off & lb_htons(LB_IP_MF | LB_IP_OFFSET))
		return LB_PARSE_FRAGMENT;

	void *l4 = (void *)ip + ihl;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->l4_off = LB_L3_OFF + ihl;
	p->l4_len = tot - ihl;

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return lb_short(data, data_end, len, hook);
		__u32 doff = th->doff * 4;
		if (doff < sizeof(struct tcphdr) || doff > p->l4_len)
			return LB_PARSE_MALFORMED;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->l4_hlen = doff;
	} else {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return lb_short(data, data_end, len, hook);
		if (sizeof(struct udphdr) > p->l4_len)
			return LB_PARSE_MALFORMED;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->tcp_flags = 0;
		p->l4_hlen = sizeof(struct udphdr);
	}
	return LB_PARSE_OK;
}

/* lb_parse_headers, after pulling the headers into the linear part if they
 * are not all there. */
static __always_inline int lb_parse(void *ctx, const enum lb_hook hook, struct lb_pkt *p)
{
	int parsed = lb_parse_headers(ctx, hook, p);

	if (parsed != LB_PARSE_SHORT)
		return parsed;
	if (lb_pull_headers(ctx, hook))
		return LB_PARSE_MALFORMED;
	parsed = lb_parse_headers(ctx, hook, p);
	return parsed == LB_PARSE_SHORT ? LB_PARSE_MALFORMED : parsed;
}

#endif /* LB_PARSE_H */
