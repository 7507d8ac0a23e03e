/* Load balancing decisions: frontend lookup, backend membership, backend
 * selection (ClientIP affinity, else a hash of the 5-tuple).
 */
#ifndef LB_LB_H
#define LB_LB_H

#include "conntrack.h"
#include "counters.h"
#include "filter.h"
#include "lb_config.h"
#include "lb_maps.h"
#include "parse.h"

/* A 32-bit integer mixer (the "lowbias32" finalizer): every input bit
 * affects every output bit. */
static __always_inline __u32 lb_mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x7feb352d;
	h ^= h >> 15;
	h *= 0x846ca68b;
	h ^= h >> 16;
	return h;
}

/* The frontend p is sent to, if any (lb_to_frontend() in flow.h asks the address filter
 * first). */
static __always_inline struct lb_svc_value *lb_service(const struct lb_pkt *p)
{
	struct lb_svc_key k = {
		.vip = p->daddr, .port = p->dport, .proto = p->proto, .pad = 0,
	};
	return services.lookup(&k);
}

static __always_inline int lb_svc_has_affinity(const struct lb_svc_value *svc)
{
	return svc->flags & LB_SVC_F_AFFINITY;
}

static __always_inline int lb_svc_has_backends(const struct lb_svc_value *svc)
{
	return svc->count > 0;
}

/* A NodePort frontend: balanced on external interfaces too. */
static __always_inline int lb_svc_is_nodeport(const struct lb_svc_value *svc)
{
	return svc->flags & LB_SVC_F_NODEPORT;
}

static __always_inline int lb_backend_is_local(const struct lb_backend_value *b)
{
	return b->flags & LB_BE_F_LOCAL;
}

/* The backend still belongs to the service. That also says it still exists, with the
 * address it had when a flow was pinned to it: the agent writes a backend before its
 * memberships and deletes it after them, and never gives its id to another endpoint
 * (ids come from the pinned id_state and are never reused). So a known flow needs this
 * one lookup, not the backend's, and only when its service's generation does not vouch for
 * it (lb_ct_member() in flow.h). */
static __always_inline int lb_is_member(__u32 svc_id, __u32 backend_id)
{
	struct lb_member_key mk = { .svc_id = svc_id, .backend_id = backend_id };

	return service_members.lookup(&mk) != NULL;
}

/* The backend if it still exists and still belongs to the service, else NULL. */
static __always_inline struct lb_backend_value *lb_backend_in_service(__u32 svc_id,
								      __u32 backend_id)
{
	if (!lb_is_member(svc_id, backend_id))
		return NULL;
	return backends.lookup(&backend_id);
}

/* Hash of the 5-tuple: the same flow always gets the same slot, so a flow
 * whose conntrack entry was lost finds its backend again while the backend
 * set is unchanged. */
static __always_inline __u32 lb_flow_hash(const struct lb_pkt *p)
{
	__u32 h = LB_HASH_SEED;

	h = lb_mix32(h ^ p->saddr);
	h = lb_mix32(h ^ p->daddr);
	h = lb_mix32(h ^ (((__u32)p->sport << 16) | p->dport));
	return lb_mix32(h ^ p->proto);
}

/* The client's affinity backend, if the entry is fresh and its backend is
 * still in the service; refreshes the entry's last use. */
static __always_inline struct lb_backend_value *
lb_affinity_backend(const struct lb_svc_value *svc, __be32 client, __u64 now, __u32 *backend_id)
{
	struct lb_affinity_key k = { .svc_id = svc->svc_id, .client = client };
	struct lb_affinity_value *a = affinity.lookup(&k);
	struct lb_backend_value *b;

	if (!a || lb_age(now, a->last_used) > (__u64)svc->affinity_timeout * LB_NSEC_PER_SEC)
		return NULL;
	b = lb_backend_in_service(svc->svc_id, a->backend_id);
	if (!b)
		return NULL;
	a->last_used = now;
	*backend_id = a->backend_id;
	return b;
}

static __always_inline void lb_affinity_remember(const struct lb_svc_value *svc, __be32 client,
						 __u32 backend_id, __u64 now)
{
	struct lb_affinity_key k = { .svc_id = svc->svc_id, .client = client };
	struct lb_affinity_value v = { .last_used = now, .backend_id = backend_id, .pad = 0 };

	affinity.update(&k, &v);
}

/* A known flow of an affinity service is activity of its client: keep the
 * affinity alive if it still names the flow's backend. */
static __always_inline void lb_affinity_touch(const struct lb_svc_value *svc, __be32 client,
					      __u32 backend_id, __u64 now)
{
	struct lb_affinity_key k = { .svc_id = svc->svc_id, .client = client };
	struct lb_affinity_value *a = affinity.lookup(&k);

	if (a && a->backend_id == backend_id)
		a->last_used = now;
}

/* Pick a backend for a new flow (or one whose backend left): the affinity
 * backend if the service has affinity and the client a fresh entry, else slot
 * hash % count. NULL if the service has no backend (or the maps contradict
 * themselves, which the agent's write order prevents). */
static __always_inline struct lb_backend_value *
lb_select_backend(const struct lb_svc_value *svc, const struct lb_pkt *p, __u64 now,
		  __u32 *backend_id, struct lb_counters *c)
{
	struct lb_backend_value *b;
	struct lb_slot_key sk;
	__u32 *id;

	if (!lb_svc_has_backends(svc))
		return NULL;
	if (lb_svc_has_affinity(svc)) {
		b = lb_affinity_backend(svc, p->saddr, now, backend_id);
		if (b) {
			LB_COUNT(c, affinity_hits);
			return b;
		}
	}

	sk.svc_id = svc->svc_id;
	sk.slot = lb_flow_hash(p) % svc->count;
	id = service_backends.lookup(&sk);
	if (!id)
		return NULL;
	*backend_id = *id;
	b = backends.lookup(id);
	if (b && lb_svc_has_affinity(svc))
		lb_affinity_remember(svc, p->saddr, *backend_id, now);
	return b;
}

#endif /* LB_LB_H */
