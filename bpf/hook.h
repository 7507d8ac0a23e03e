/* The two program types behind one interface, so that tc (struct __sk_buff)
 * and XDP (struct xdp_md) entry points run the same parsing, load balancing
 * and conntrack code.
 *
 * Each function takes the context as void * and the hook as a constant.
 * Every caller is __always_inline, so each entry point keeps only its own
 * branch: the verifier of an XDP program never sees an skb helper, nor the
 * reverse.
 */
#ifndef LB_HOOK_H
#define LB_HOOK_H

#include <linux/pkt_cls.h>

enum lb_hook {
	LB_HOOK_TC,  /* tc clsact, direct-action: pod veths, external interfaces */
	LB_HOOK_XDP, /* XDP on an external interface (native or generic) */
};

static __always_inline void *lb_data(void *ctx, const enum lb_hook hook)
{
	if (hook == LB_HOOK_XDP)
		return (void *)(long)((struct xdp_md *)ctx)->data;
	return (void *)(long)((struct __sk_buff *)ctx)->data;
}

static __always_inline void *lb_data_end(void *ctx, const enum lb_hook hook)
{
	if (hook == LB_HOOK_XDP)
		return (void *)(long)((struct xdp_md *)ctx)->data_end;
	return (void *)(long)((struct __sk_buff *)ctx)->data_end;
}

/* Declared here: bcc 0.26 does not know the helper (Linux 5.18). */
static __u64 (*lb_xdp_get_buff_len)(struct xdp_md *ctx) = (void *)BPF_FUNC_xdp_get_buff_len;

/* The whole packet's length: an skb's includes its paged part (GSO). */
static __always_inline __u32 lb_len(void *ctx, const enum lb_hook hook)
{
	if (hook == LB_HOOK_XDP)
		return (__u32)lb_xdp_get_buff_len(ctx);
	return ((struct __sk_buff *)ctx)->len;
}

/* The interface the packet came in on. */
static __always_inline __u32 lb_ifindex(void *ctx, const enum lb_hook hook)
{
	if (hook == LB_HOOK_XDP)
		return ((struct xdp_md *)ctx)->ingress_ifindex;
	return ((struct __sk_buff *)ctx)->ifindex;
}

static __always_inline int lb_load_bytes(void *ctx, const enum lb_hook hook, __u32 off, void *to,
					 __u32 len)
{
	if (hook == LB_HOOK_XDP)
		return bpf_xdp_load_bytes(ctx, off, to, len);
	return bpf_skb_load_bytes(ctx, off, to, len);
}

static __always_inline int lb_store_bytes(void *ctx, const enum lb_hook hook, __u32 off,
					  void *from, __u32 len)
{
	if (hook == LB_HOOK_XDP)
		return bpf_xdp_store_bytes(ctx, off, from, len);
	return bpf_skb_store_bytes(ctx, off, from, len, 0);
}

/* Cut or grow the packet to len bytes. */
static __always_inline int lb_set_len(void *ctx, const enum lb_hook hook, __u32 len)
{
	if (hook == LB_HOOK_XDP)
		return bpf_xdp_adjust_tail(ctx, (int)len - (int)lb_len(ctx, hook));
	return bpf_skb_change_tail(ctx, len, 0);
}

/* Verdicts. */
static __always_inline int lb_pass(const enum lb_hook hook)
{
	return hook == LB_HOOK_XDP ? XDP_PASS : TC_ACT_OK;
}

static __always_inline int lb_drop(const enum lb_hook hook)
{
	return hook == LB_HOOK_XDP ? XDP_DROP : TC_ACT_SHOT;
}

/* Out of the interface the packet came in on. */
static __always_inline int lb_send_back(void *ctx, const enum lb_hook hook)
{
	if (hook == LB_HOOK_XDP)
		return XDP_TX;
	return bpf_redirect(((struct __sk_buff *)ctx)->ifindex, 0);
}

#endif /* LB_HOOK_H */
