"""The datapath's clock, as the manager, `table` and the tests read it."""

import time

CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; Python's time module does not name it


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns(), which stamps last_seen_ns (the coarse one: a frame seen
    just after this call never carries an earlier stamp)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
