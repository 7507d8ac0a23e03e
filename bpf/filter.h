/* Per-address filters: answers from an address alone, one bit per slot of a
 * hash of it, in array maps whose lookups the verifier inlines and whose word
 * for an address stays in cache. A clear bit lets a lookup that would miss
 * (a cold miss in a big hash table, for every new connection's ports) be
 * skipped; a set bit, or a filter not "ready", only costs that lookup.
 *
 *  - The address filter (addr_filter): may an address be a frontend's or a
 *    backend's? Written by the agent only (ebpflb/datapath/addrfilter.py).
 *  - The reply filter (reply_filter): may a reverse conntrack entry of this
 *    backend address exist? Marked by the datapath before it inserts one,
 *    unmarked by the agent's rebuild (ebpflb/datapath/replyfilter.py).
 */
#ifndef LB_FILTER_H
#define LB_FILTER_H

#include "lb_config.h"
#include "lb_maps.h"

/* An address's slot, in both filters: the top LB_ADDR_FILTER_BITS bits of
 * (addr ^ addr >> 16) * LB_ADDR_FILTER_MUL (Fibonacci hashing: one multiply;
 * the xor brings the low octets, in the high bits of the __be32, down).
 * ebpflb/datapath/addrfilter.py (slots()) computes the same. */
static __always_inline __u32 lb_addr_slot(__be32 addr)
{
	__u32 h = (__u32)addr ^ ((__u32)addr >> 16);

	return (h * LB_ADDR_FILTER_MUL) >> (32 - LB_ADDR_FILTER_BITS);
}

/* Kinds of address in the address filter (addr_filter in lb_maps.h). */
#define LB_ADDR_FRONTEND 1
#define LB_ADDR_BACKEND 2

/* addr may be of this kind: 0 only if it certainly is not, so that the lookup
 * it guards can be skipped. Most packets a node's programs see are neither to a
 * frontend nor from a backend (pod to pod, replies to clients, the node's own
 * traffic): their lookups miss, and a miss in a big hash table is a cache miss
 * when the key is new (every new connection's ports). The filter's word for an
 * address is the same for all its packets, so it stays in cache, and an array
 * lookup is inlined by the verifier: a few ns instead of hundreds. */
static __always_inline int lb_addr_may_be(__be32 addr, const __u32 kind)
{
	__u32 slot = lb_addr_slot(addr);
	__u32 index = 1 + slot / 32, zero = 0;
	__u64 *ready = addr_filter.lookup(&zero), *word;

	if (!ready || !*ready)
		return 1;
	word = addr_filter.lookup(&index);
	if (!word)
		return 1;
	return (*word >> (2 * (slot % 32))) & kind;
}

/* The reply filter's entry 0 (reply_filter in lb_maps.h): the current epoch,
 * whose bitmap programs mark addresses in. (Bit 0 is the agent's: both
 * bitmaps rewritten once; the datapath never needs it.) */
#define LB_RF_EPOCH 0x2

/* The entry of a slot's word in an epoch's bitmap. */
static __always_inline __u32 lb_rf_index(__u32 epoch, __u32 slot)
{
	return 1 + epoch * LB_REPLY_FILTER_WORDS + slot / 64;
}

/* Before a reverse entry keyed by backend address addr is inserted: mark addr
 * (clear its "none" bit) in the current epoch's bitmap. The agent rewrites
 * only the other epoch's bitmap, after flipping the epoch and waiting for every
 * program that may have read the old one (an RCU grace period: programs run
 * inside RCU read-side sections), so a mark made here stays until the agent
 * has seen the entry in conntrack; the whole argument is in bpf/README.md
 * ("The reply filter"). Most inserts find addr marked (a backend's other
 * flows): reading first keeps the word's cache line shared instead of
 * bouncing it between CPUs with an atomic per flow. The epoch is read once. */
static __always_inline void lb_reply_mark(__be32 addr)
{
	__u32 zero = 0, slot = lb_addr_slot(addr), index;
	__u64 *head = reply_filter.lookup(&zero), *word, bit = 1ULL << (slot % 64);

	if (!head)
		return; /* cannot happen: an array's entry 0 */
	index = lb_rf_index((*(volatile __u64 *)head & LB_RF_EPOCH) ? 1 : 0, slot);
	word = reply_filter.lookup(&index);
	if (word && (*word & bit)) /* always found: slot < 2^LB_ADDR_FILTER_BITS */
		__sync_fetch_and_and(word, ~bit);
}

/* A reverse entry keyed by backend address addr may exist: 0 only if both
 * epochs' bitmaps say "none" for addr's slot, so that the reverse lookup can be
 * skipped. With socket-level load balancing a backend's packets reach the tc
 * programs as packets of no balanced flow (the client connected to the backend
 * itself): without this each paid a cold conntrack miss. A bit set means
 * "none" so that a map of zeros (new, or made by a migration: the copied
 * entries were never marked) says "may" for every address until the agent has
 * rewritten both bitmaps, with no "ready" flag to read here. */
static __always_inline int lb_reply_may_exist(__be32 addr)
{
	__u32 slot = lb_addr_slot(addr);
	__u32 i0 = lb_rf_index(0, slot), i1 = lb_rf_index(1, slot);
	__u64 *w;

	w = reply_filter.lookup(&i0);
	if (!w || !((*w >> (slot % 64)) & 1)) /* a reply: mostly marked in both */
		return 1;
	w = reply_filter.lookup(&i1);
	return !w || !((*w >> (slot % 64)) & 1);
}

#endif /* LB_FILTER_H */
