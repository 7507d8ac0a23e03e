/* NodePort on an external interface (the node's interface towards the
 * clients and the other nodes), one decision for XDP and tc alike:
 *  - a packet to a NodePort frontend is DNATed to a backend. One on this
 *    node gets it from the kernel with the client's address kept (also
 *    externalTrafficPolicy=Local's only way); one on another node gets it
 *    SNATed to this node and routed by the program, so that its replies come
 *    back here, the only node that knows the client;
 *  - a reply to a SNATed flow (to the node's SNAT address) goes back to the
 *    client from the NodePort, routed by the program;
 *  - anything else goes on untouched: traffic between pods of different
 *    nodes, the node's own traffic, and other frontends (a ClusterIP is not
 *    reachable from outside). Replies from local backends are translated on
 *    the backend pod's veth (from_pod), not here.
 */
#ifndef LB_NODEPORT_H
#define LB_NODEPORT_H

#include "counters.h"
#include "flow.h"
#include "lb.h"
#include "node.h"
#include "parse.h"

static __always_inline int lb_external(const struct lb_pkt *p, const struct lb_node_config *cfg,
				       struct lb_nat *n, struct lb_counters *c)
{
	__be32 snat_ip = lb_snat_ip(cfg);
	int act = lb_to_frontend(p, cfg, 1, n, c);

	if (act != LB_ACT_NEXT)
		return act;
	if (snat_ip && p->daddr == snat_ip)
		return lb_reverse(p, cfg, 1, 1, n, c);
	LB_COUNT(c, passed);
	return LB_ACT_PASS;
}

#endif /* LB_NODEPORT_H */
