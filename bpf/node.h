/* This node's settings as the agent wrote them in node_config: its
 * addresses (NodePort frontends, SNAT source, martian sources), the SNAT port
 * range and the external interfaces.
 */
#ifndef LB_NODE_H
#define LB_NODE_H

#include "lb_maps.h"
#include "lb_structs.h"

static __always_inline const struct lb_node_config *lb_node_config_get(void)
{
	__u32 zero = 0;
	return node_config.lookup(&zero);
}

/* addr is one of this node's addresses. A packet with such a source that
 * arrives on an interface is dropped by the kernel's input routing as a
 * martian (fib_validate_source): the datapath must route it itself. */
static __always_inline int lb_is_node_ip(const struct lb_node_config *cfg, __be32 addr)
{
	if (!cfg || !addr)
		return 0;
#pragma unroll
	for (int i = 0; i < LB_MAX_NODE_IPS; i++)
		if (cfg->node_ips[i] == addr)
			return 1;
	return 0;
}

/* The source address of SNATed NodePort flows (0: none configured). */
static __always_inline __be32 lb_snat_ip(const struct lb_node_config *cfg)
{
	return cfg ? cfg->node_ips[0] : 0;
}

/* LB_IF_F_* of an external interface (0 if it is not listed). */
static __always_inline __u32 lb_iface_flags(const struct lb_node_config *cfg, __u32 ifindex)
{
	if (!cfg || !ifindex)
		return 0;
#pragma unroll
	for (int i = 0; i < LB_MAX_EXT_IFACES; i++)
		if (cfg->ext_ifindex[i] == ifindex)
			return cfg->ext_flags[i];
	return 0;
}

#endif /* LB_NODE_H */
