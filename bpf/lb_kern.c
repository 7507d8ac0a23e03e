/* ebpflb's datapath, loaded by ebpflb/datapath/loader.py: eight entry points,
 * one body (parse.h, lb.h, conntrack.h, flow.h), all sharing the pinned maps.
 *
 * Pod veths (tc, clsact, direct-action):
 *   from_pod: ingress of each pod's host-side veth. A packet from the pod to
 *     a frontend is DNATed to a backend; a backend's reply to a balanced flow
 *     is reverse-NATed to come from the VIP (and routed by the program when
 *     the VIP is a node address); anything else goes on untouched.
 *   to_pod: egress of the same veths, for replies that never crossed a
 *     local pod's ingress (a backend on another node): reverse NAT only.
 *
 * External interfaces (the node's addresses, where NodePort clients come from):
 *   nodeport_xdp: XDP (native or generic), the fast path.
 *   nodeport_tc: tc ingress; alone where XDP is not wanted, and behind XDP
 *     for what XDP leaves to it (see xdp.h).
 *
 * A cgroup (v2) of the node's processes, when socket-level load balancing is
 * on (sock.h): frontends translated per system call, not per packet.
 *   sock_connect4, sock_sendmsg4: a frontend becomes a backend.
 *   sock_peername4, sock_recvmsg4: the backend reads as the frontend again.
 * (No sock_release program: a connected socket's way back is in its own
 * storage, freed by the kernel with it; older datapaths attached one, which
 * the loader detaches.)
 */
#include <uapi/linux/bpf.h>
#include <linux/pkt_cls.h>

#include "lb_config.h"
#include "lb_structs.h"
#include "lb_maps.h"
#include "counters.h"
#include "hook.h"
#include "parse.h"
#include "node.h"
#include "flow.h"
#include "nodeport.h"
#include "tc.h"
#include "xdp.h"
#include "sock.h"

/* Count why a packet was not parsed and let it go on unchanged. */
static __always_inline int lb_pass_unparsed(struct lb_counters *c, int parsed,
					    const enum lb_hook hook)
{
	if (parsed == LB_PARSE_OTHER)
		LB_COUNT(c, other);
	else if (parsed == LB_PARSE_FRAGMENT)
		LB_COUNT(c, fragments);
	else
		LB_COUNT(c, malformed);
	return lb_pass(hook);
}

int from_pod(struct __sk_buff *skb)
{
	struct lb_counters *c = lb_counters_get();
	const struct lb_node_config *cfg;
	struct lb_nat n = {};
	struct lb_pkt p = {};
	int parsed, act;

	LB_COUNT(c, packets);
	parsed = lb_parse(skb, LB_HOOK_TC, &p);
	if (parsed != LB_PARSE_OK)
		return lb_pass_unparsed(c, parsed, LB_HOOK_TC);
	cfg = lb_node_config_get();
	act = lb_to_frontend(&p, cfg, 0, &n, c);
	if (act == LB_ACT_NEXT)
		act = lb_reverse(&p, cfg, 0, 1, &n, c);
	return lb_tc_act(skb, act, &p, &n, c);
}

int to_pod(struct __sk_buff *skb)
{
	struct lb_counters *c = lb_counters_get();
	struct lb_nat n = {};
	struct lb_pkt p = {};
	int parsed, act;

	LB_COUNT(c, packets);
	parsed = lb_parse(skb, LB_HOOK_TC, &p);
	if (parsed != LB_PARSE_OK)
		return lb_pass_unparsed(c, parsed, LB_HOOK_TC);
	act = lb_reverse(&p, NULL, 0, 0, &n, c);
	return lb_tc_act(skb, act, &p, &n, c);
}

int nodeport_tc(struct __sk_buff *skb)
{
	struct lb_counters *c = lb_counters_get();
	const struct lb_node_config *cfg;
	struct lb_nat n = {};
	struct lb_pkt p = {};
	int parsed, act;

	LB_COUNT(c, packets);
	parsed = lb_parse(skb, LB_HOOK_TC, &p);
	if (parsed != LB_PARSE_OK)
		return lb_pass_unparsed(c, parsed, LB_HOOK_TC);
	cfg = lb_node_config_get();
	act = lb_external(&p, cfg, &n, c);
	if (act == LB_ACT_NAT || act == LB_ACT_REFUSE)
		LB_COUNT(c, nodeport_tc);
	return lb_tc_act(skb, act, &p, &n, c);
}

int nodeport_xdp(struct xdp_md *ctx)
{
	struct lb_counters *c = lb_counters_get();
	const struct lb_node_config *cfg;
	struct lb_nat n = {};
	struct lb_pkt p = {};
	int parsed, act;

	LB_COUNT(c, packets);
	parsed = lb_parse(ctx, LB_HOOK_XDP, &p);
	if (parsed != LB_PARSE_OK)
		return lb_pass_unparsed(c, parsed, LB_HOOK_XDP);
	cfg = lb_node_config_get();
	act = lb_external(&p, cfg, &n, c);
	return lb_xdp_act(ctx, act, &p, &n, cfg, c);
}

/* cgroup/connect4 (TCP, connected UDP). 1: the call goes on (never refused here). */
int sock_connect4(struct bpf_sock_addr *ctx)
{
	lb_sock_connect(ctx, lb_counters_get());
	return 1;
}

/* cgroup/sendmsg4: a datagram of an unconnected UDP socket. */
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	lb_sock_sendmsg(ctx, lb_counters_get());
	return 1;
}

/* cgroup/getpeername4 (the name is short enough for the kernel's 15 characters). */
int sock_peername4(struct bpf_sock_addr *ctx)
{
	lb_sock_reverse(ctx, lb_counters_get());
	return 1;
}

/* cgroup/recvmsg4: the source of a datagram read by an unconnected UDP socket. */
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	lb_sock_reverse(ctx, lb_counters_get());
	return 1;
}
