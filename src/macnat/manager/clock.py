"""The datapath's clock, as the manager reads it."""

import time


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns(), which stamps last_seen_ns."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
