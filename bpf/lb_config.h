/* Compile-time configuration of the datapath.
 *
 * Every size and lifetime is a -D flag with a default here; the loader
 * (ebpflb/datapath/loader.py) passes the values it was given and checks that
 * maps adopted from the bpffs were created with the same sizes.
 */
#ifndef LB_CONFIG_H
#define LB_CONFIG_H

/* bpffs directory the maps are pinned under, e.g. "/sys/fs/bpf/ebpflb". */
#ifndef LB_PIN_DIR
#error "LB_PIN_DIR must be defined (a quoted bpffs directory)"
#endif

/* Map capacities (entries). */
#ifndef LB_MAX_SERVICES
#define LB_MAX_SERVICES 65536
#endif
#ifndef LB_MAX_BACKENDS
#define LB_MAX_BACKENDS 65536
#endif
#ifndef LB_MAX_SERVICE_BACKENDS
#define LB_MAX_SERVICE_BACKENDS 262144
#endif
#ifndef LB_MAX_CONNTRACK
#define LB_MAX_CONNTRACK 262144
#endif
#ifndef LB_MAX_AFFINITY
#define LB_MAX_AFFINITY 65536
#endif
#ifndef LB_MAX_SOCK_REVNAT
#define LB_MAX_SOCK_REVNAT 131072 /* sockets translated by the socket-level programs */
#endif

/* Connection lifetimes in seconds, like the kernel's conntrack (and Cilium's). */
#ifndef LB_CT_LIFETIME_TCP
#define LB_CT_LIFETIME_TCP 21600 /* established: 6 h */
#endif
#ifndef LB_CT_LIFETIME_SYN
#define LB_CT_LIFETIME_SYN 60 /* SYN sent, handshake not finished */
#endif
#ifndef LB_CT_LIFETIME_CLOSE
#define LB_CT_LIFETIME_CLOSE 10 /* FIN or RST seen */
#endif
#ifndef LB_CT_LIFETIME_UDP
#define LB_CT_LIFETIME_UDP 30 /* idle UDP flow */
#endif

/* An entry's timestamp is rewritten at most this often (ns) unless its state
 * changes: fewer map writes and cache-line bounces, at most this much slack
 * on every lifetime. */
#ifndef LB_CT_REFRESH_NS
#define LB_CT_REFRESH_NS 1000000000ULL
#endif

/* The clock (lb_now() in conntrack.h): the running kernel's TICK_NSEC and
 * INITIAL_JIFFIES, so no defaults. The loader passes both or, where it could
 * not find HZ, neither (the clock is then CLOCK_MONOTONIC_COARSE). */
#if defined(LB_TICK_NS) != defined(LB_INITIAL_JIFFIES)
#error "LB_TICK_NS and LB_INITIAL_JIFFIES must be defined together"
#endif

/* Hairpin source address, host byte order (the loader converts the dotted
 * form): 169.254.42.1, link-local, never a pod's address. */
#ifndef LB_HAIRPIN_ADDR
#define LB_HAIRPIN_ADDR 0xa9fe2a01
#endif

/* Seed of the flow hash that picks a backend slot. */
#ifndef LB_HASH_SEED
#define LB_HASH_SEED 0x5eed1b5
#endif

/* The helper number a tc program calls for the kfunc bpf_cast_to_kern_ctx (nat.h):
 * none of the kernel's helpers, so that a call the compiler child did not turn into
 * the kfunc call fails to load. ebpflb/datapath/compile.py has the same number. */
#define LB_KFUNC_KERN_CTX_CALL 0x7eb1

/* The address filter (lb_addr_may_be() in lb.h): 2^LB_ADDR_FILTER_BITS slots
 * of 2 bits each, 32 to a 64-bit word, and the multiplier of the hash that
 * picks an address's slot. Fixed, not -D flags: ebpflb/datapath/addrfilter.py
 * computes the same slots. 2^20 slots (256 KiB) keep false positives under 10%
 * for 100,000 addresses. */
#define LB_ADDR_FILTER_BITS 20
#define LB_ADDR_FILTER_SLOTS (1U << LB_ADDR_FILTER_BITS)
#define LB_ADDR_FILTER_WORDS (LB_ADDR_FILTER_SLOTS / 32)
#define LB_ADDR_FILTER_MUL 0x9e3779b1U /* 2^32 / the golden ratio, odd */

/* The reply filter (lb_reply_may_exist() in filter.h): the address filter's
 * slots, one bit each, 64 to a word, in two bitmaps (epochs) of this many
 * words: 2 x 128 KiB. Fixed: ebpflb/datapath/replyfilter.py computes the same. */
#define LB_REPLY_FILTER_WORDS (LB_ADDR_FILTER_SLOTS / 64)

_Static_assert(LB_MAX_SERVICES > 0 && LB_MAX_BACKENDS > 0, "map sizes must be positive");
_Static_assert(LB_MAX_SERVICE_BACKENDS >= LB_MAX_BACKENDS, "every backend needs a slot");
_Static_assert(LB_MAX_CONNTRACK >= 2, "a flow takes two conntrack entries");
_Static_assert(LB_MAX_AFFINITY > 0, "map sizes must be positive");
_Static_assert(LB_CT_LIFETIME_CLOSE > 0 && LB_CT_LIFETIME_SYN > 0 && LB_CT_LIFETIME_TCP > 0 &&
		       LB_CT_LIFETIME_UDP > 0,
	       "lifetimes must be positive");

#define LB_NSEC_PER_SEC 1000000000ULL

/* Byte order for constants (BPF here is little-endian, as is the host). */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "only little-endian targets are supported"
#endif
#define lb_htons(x) ((__be16)__builtin_bswap16((__u16)(x)))
#define lb_ntohs(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define lb_htonl(x) ((__be32)__builtin_bswap32((__u32)(x)))
#define lb_ntohl(x) ((__u32)__builtin_bswap32((__u32)(x)))

#define LB_HAIRPIN_IP lb_htonl(LB_HAIRPIN_ADDR)

#endif /* LB_CONFIG_H */
