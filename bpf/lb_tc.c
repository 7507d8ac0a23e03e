/* ebpflb's ClusterIP datapath for pods, loaded by ebpflb/datapath/loader.py.
 *
 * from_pod: tc ingress (clsact, direct-action) of each pod's host-side veth.
 * A packet from the pod to a frontend is DNATed to a backend; a backend's
 * reply to a balanced flow is reverse-NATed to come from the VIP; anything
 * else goes on untouched.
 *
 * to_pod: tc egress of the same veths, for replies that never crossed a
 * local pod's ingress (a backend on another node): reverse NAT only.
 */
#include <uapi/linux/bpf.h>
#include <linux/pkt_cls.h>

#include "lb_config.h"
#include "lb_structs.h"
#include "lb_maps.h"
#include "counters.h"
#include "parse.h"
#include "flow.h"

/* Count why a packet was not parsed and let it go on unchanged. */
static __always_inline int lb_pass_unparsed(struct lb_counters *c, int parsed)
{
	if (parsed == LB_PARSE_OTHER)
		LB_COUNT(c, other);
	else if (parsed == LB_PARSE_FRAGMENT)
		LB_COUNT(c, fragments);
	else
		LB_COUNT(c, malformed);
	return TC_ACT_OK;
}

int from_pod(struct __sk_buff *skb)
{
	struct lb_counters *c = lb_counters_get();
	struct lb_svc_value *svc;
	struct lb_pkt p = {};
	int parsed;

	LB_COUNT(c, packets);
	parsed = lb_parse(skb, &p);
	if (parsed != LB_PARSE_OK)
		return lb_pass_unparsed(c, parsed);
	svc = lb_lookup_service(&p);
	if (svc)
		return lb_forward(skb, &p, svc, c);
	return lb_reverse(skb, &p, c);
}

int to_pod(struct __sk_buff *skb)
{
	struct lb_counters *c = lb_counters_get();
	struct lb_pkt p = {};
	int parsed;

	LB_COUNT(c, packets);
	parsed = lb_parse(skb, &p);
	if (parsed != LB_PARSE_OK)
		return lb_pass_unparsed(c, parsed);
	return lb_reverse(skb, &p, c);
}
