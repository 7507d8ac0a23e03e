/* Socket-level load balancing: a frontend is translated to a backend when a
 * process connects (TCP, connected UDP) or sends a datagram (unconnected UDP),
 * in cgroup/connect4 and cgroup/sendmsg4, before any packet exists. The
 * connection then runs from pod to backend as if the process had dialled the
 * backend itself: no per-packet NAT and no conntrack entry (the tc programs
 * see packets to no frontend). What the process is told about its peer is
 * written back in cgroup/getpeername4 (TCP, connected UDP) and
 * cgroup/recvmsg4 (a datagram's source).
 *
 * The way back: a connected socket has one peer, kept in the socket's own
 * storage (sock_peer), which the kernel frees with the socket; nothing runs
 * at close. An unconnected UDP socket may send to many VIPs, so its ways back
 * are entries of the LRU map sock_revnat, keyed by socket cookie and backend.
 *
 * Left to the tc programs, untouched here: frontends without backends (tc
 * refuses the SYN with a RST, so connect() fails with ECONNREFUSED as it
 * should), ClientIP affinity (keyed by the client's address, which a socket
 * may not have at connect), sockets other than TCP stream and UDP datagram
 * ones, and every process outside the cgroup the agent attached to.
 *
 * A connected socket keeps its backend for its whole life, also if the
 * backend later leaves the Service (the tc path would move the flow): as with
 * Cilium's socket LB, the connection ends when the backend goes away. An
 * unconnected UDP socket is balanced per datagram, so it follows changes at
 * once.
 */
#ifndef LB_SOCK_H
#define LB_SOCK_H

#include <linux/in.h>
#include <linux/net.h>

#include "counters.h"
#include "lb.h"
#include "lb_maps.h"

/* The frontend the socket addresses, if it is balanced here (see above). */
static __always_inline struct lb_svc_value *lb_sock_service(struct bpf_sock_addr *ctx,
							     struct lb_svc_key *k)
{
	struct lb_svc_value *svc;
	__u32 proto = ctx->protocol;
	__u32 type = ctx->type;

	if (!((proto == IPPROTO_TCP && type == SOCK_STREAM) ||
	      (proto == IPPROTO_UDP && type == SOCK_DGRAM)))
		return NULL;
	k->vip = ctx->user_ip4;
	k->port = (__be16)ctx->user_port; /* network order, in the low 16 bits */
	k->proto = (__u8)proto;
	k->pad = 0;
	if (!lb_addr_may_be(k->vip, LB_ADDR_FRONTEND))
		return NULL;
	svc = services.lookup(k);
	if (!svc || !lb_svc_has_backends(svc) || lb_svc_has_affinity(svc))
		return NULL;
	return svc;
}

/* The socket's slot: the same socket sending to the same frontend gets the
 * same backend while the service's backends are unchanged (an unconnected UDP
 * socket's datagrams, and the replies it expects, stay on one backend), and
 * sockets spread evenly (cookies are distinct). */
static __always_inline __u32 lb_sock_hash(__u64 cookie, const struct lb_svc_key *k)
{
	__u32 h = LB_HASH_SEED;

	h = lb_mix32(h ^ (__u32)cookie);
	h = lb_mix32(h ^ (__u32)(cookie >> 32));
	h = lb_mix32(h ^ k->vip);
	return lb_mix32(h ^ (((__u32)k->port << 16) | k->proto));
}

/* The backend the socket gets for frontend k of svc (see lb_sock_hash). */
static __always_inline struct lb_backend_value *lb_sock_backend(struct bpf_sock_addr *ctx,
								 const struct lb_svc_value *svc,
								 const struct lb_svc_key *k)
{
	struct lb_slot_key sk;
	__u32 *id;

	sk.svc_id = svc->svc_id;
	sk.slot = lb_sock_hash(bpf_get_socket_cookie(ctx), k) % svc->count;
	id = service_backends.lookup(&sk);
	if (!id)
		return NULL;
	return backends.lookup(id);
}

/* connect4: a frontend becomes one of its backends, once the socket's storage
 * remembers both; without it the tc path balances as before. Any other
 * destination clears the storage: a UDP socket connected again elsewhere must
 * not have its new peer's datagrams read as the old VIP's. */
static __always_inline void lb_sock_connect(struct bpf_sock_addr *ctx, struct lb_counters *c)
{
	struct lb_backend_value *b = NULL;
	struct lb_sock_peer *peer;
	struct lb_svc_value *svc;
	struct lb_svc_key k;

	svc = lb_sock_service(ctx, &k);
	if (svc)
		b = lb_sock_backend(ctx, svc, &k);
	if (!b) {
		sock_peer.sk_storage_delete(ctx->sk); /* mostly none: no cost but the look */
		return;
	}
	peer = sock_peer.sk_storage_get(ctx->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!peer) {
		LB_COUNT(c, errors);
		return;
	}
	peer->addr = b->addr;
	peer->port = b->port;
	peer->vip = k.vip;
	peer->vip_port = k.port;
	ctx->user_ip4 = b->addr;
	ctx->user_port = (__u32)b->port;
	LB_COUNT(c, sock_xlate);
}

/* sendmsg4: a datagram of an unconnected UDP socket to a frontend goes to one
 * of its backends, once its way back (sock_revnat) is remembered. */
static __always_inline void lb_sock_sendmsg(struct bpf_sock_addr *ctx, struct lb_counters *c)
{
	struct lb_backend_value *b;
	struct lb_svc_value *svc;
	struct lb_sock_value *old;
	struct lb_sock_value v = {};
	struct lb_sock_key rk = {};
	struct lb_svc_key k;

	svc = lb_sock_service(ctx, &k);
	if (!svc)
		return;
	b = lb_sock_backend(ctx, svc, &k);
	if (!b)
		return;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = b->addr;
	rk.port = b->port;
	rk.proto = k.proto;
	old = sock_revnat.lookup(&rk);
	if (!old || old->vip != k.vip || old->port != k.port) {
		v.vip = k.vip;
		v.port = k.port;
		if (sock_revnat.update(&rk, &v)) {
			LB_COUNT(c, errors);
			return;
		}
	}
	ctx->user_ip4 = b->addr;
	ctx->user_port = (__u32)b->port;
	LB_COUNT(c, sock_xlate);
}

/* getpeername4, recvmsg4: a backend this socket was given reads as the VIP
 * the process asked for. The socket's storage first (connected sockets); then
 * sock_revnat (unconnected UDP, and sockets connected by an older datapath,
 * whose entries the migration copied). */
static __always_inline void lb_sock_reverse(struct bpf_sock_addr *ctx, struct lb_counters *c)
{
	struct lb_sock_key rk = {};
	struct lb_sock_peer *peer;
	struct lb_sock_value *v;
	__be16 port = (__be16)ctx->user_port;

	peer = sock_peer.sk_storage_get(ctx->sk, NULL, 0);
	if (peer && peer->addr == ctx->user_ip4 && peer->port == port) {
		ctx->user_ip4 = peer->vip;
		ctx->user_port = (__u32)peer->vip_port;
		LB_COUNT(c, sock_revnat);
		return;
	}
	/* Only a backend's address was ever given out: any other peer (a server's accepted
	 * socket, a pod dialled directly) skips a sock_revnat lookup that would miss, on a
	 * key never seen (a cold bucket). A datagram from a backend deleted meanwhile
	 * reads as the backend's. */
	if (!lb_addr_may_be(ctx->user_ip4, LB_ADDR_BACKEND))
		return;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = port;
	rk.proto = (__u8)ctx->protocol;
	v = sock_revnat.lookup(&rk);
	if (!v)
		return;
	ctx->user_ip4 = v->vip;
	ctx->user_port = (__u32)v->port;
	LB_COUNT(c, sock_revnat);
}

#endif /* LB_SOCK_H */
