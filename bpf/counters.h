/* Per-CPU counters: one lookup per packet, then plain increments. */
#ifndef LB_COUNTERS_H
#define LB_COUNTERS_H

#include "lb_maps.h"

static __always_inline struct lb_counters *lb_counters_get(void)
{
	__u32 zero = 0;
	return counters.lookup(&zero);
}

/* Per-CPU: no other CPU writes this copy, so no atomics are needed. */
#define LB_COUNT(c, field)                                                                         \
	do {                                                                                       \
		if (c)                                                                             \
			(c)->field++;                                                              \
	} while (0)

#endif /* LB_COUNTERS_H */
