"""CPU per byte: what each setup costs the machine to move the same traffic, which does not depend on
where the scheduler puts iperf3 and the softirqs (throughput on 2 cores swings by 30% round to round).

At a fixed offered rate that every setup sustains (iperf3 -b), the whole machine's busy CPU time
(all CPUs: the time they were not idle) during the transfer, minus what the machine spent in the same
time without the transfer just before, per gigabyte received. Sender, receiver and the forwarding all
run on this one kernel, so the difference between setups is their forwarding path. iperf3's sender
and receiver share one CPU (iperf3 -A), and with them the softirqs that carry each frame the whole
way: veth hands a frame on in the CPU that sent it. Waking a receiver on the other CPU is an
inter-processor interrupt, which a virtual machine pays for with an exit to its hypervisor, at a
cost that depends on how long that CPU had slept (in perf, one UDP LAN -> VM transfer spent 3.6% of
its samples on that wake-up under plain bridging, and the next, under macnat, 8.0%). Paired,
interleaved rounds; the ratio is per round to (a), plain bridging.

Busy time is wall time minus the time cpuidle measured each CPU in its idle states (microseconds),
read on each CPU in turn: cpuidle adds an idle period to the count only when the CPU wakes from it.
/proc/stat is the fallback on a machine without a cpuidle driver: with tick-based accounting it
charges each whole tick to whatever ran at that instant, too coarse for a TCP transfer, which GSO
makes cheap per byte.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

from macnat import lab
from macnat.bench import setups, traffic

TICKS = os.sysconf("SC_CLK_TCK")
TCP_RATE = "5G"          # bits/s: every setup moves this on one CPU in the lab, using about half of it,
                         # and the transfer stands well above what else the machine does meanwhile
UDP_RATE = "400M"
UDP_LENGTH = 1400        # bytes of payload: full-size datagrams, so the rate is sustainable
IDLE_BASELINE_S = 2.0    # the machine's own busy rate, measured before each transfer
TRANSFER_CPU = max(os.sched_getaffinity(0))   # where iperf3's sender, receiver and their softirqs run
FLOWS = (("tcp_up", "tcp", False), ("tcp_down", "tcp", True), ("udp_up", "udp", False), ("udp_down", "udp", True))


def _idle_state_times() -> dict[int, list[Path]]:
    """Each CPU's cpuidle residency counters (microseconds in each idle state), by CPU number; none if
    this process may not run on every one of those CPUs (a cpuset), since each is read from its CPU."""
    times: dict[int, list[Path]] = {}
    for path in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpuidle/state[0-9]*/time")):
        times.setdefault(int(path.parts[5][3:]), []).append(path)
    return times if set(times) <= os.sched_getaffinity(0) else {}


IDLE_STATE_TIMES = _idle_state_times()
CLOCK = "cpuidle" if IDLE_STATE_TIMES else "/proc/stat"


def busy_seconds() -> float:
    """CPU time spent not idle, summed over the CPUs, since some fixed instant (only differences count)."""
    if IDLE_STATE_TIMES:
        allowed = os.sched_getaffinity(0)
        try:
            return sum(_busy_on(cpu, paths) for cpu, paths in IDLE_STATE_TIMES.items())
        finally:
            os.sched_setaffinity(0, allowed)
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS


def _busy_on(cpu: int, state_times: list[Path]) -> float:
    """One CPU's busy time, read on that CPU (this thread moves there; the caller moves it back).
    cpuidle adds an idle period to its state's time only when the CPU leaves it, so read from elsewhere
    a CPU idle for the past second looks busy for that second (and the second comes back at its next
    wake-up). Running there, this thread is what keeps it awake."""
    os.sched_setaffinity(0, {cpu})
    return time.monotonic() - sum(int(path.read_text()) for path in state_times) / 1e6


def transfer(kind: str, reverse: bool, seconds: int) -> tuple[float, float]:
    """(busy CPU seconds beyond the idle baseline, bytes received) for one fixed-rate transfer vm1 <-> LAN host."""
    vm1, lanhost = lab.VMS["vm1"].ns, lab.LANHOST
    extra = ["-b", TCP_RATE] if kind == "tcp" else ["-u", "-b", UDP_RATE, "-l", str(UDP_LENGTH)]
    extra += ["-A", f"{TRANSFER_CPU},{TRANSFER_CPU}"]
    if reverse:
        extra.append("-R")
    before, started = busy_seconds(), time.monotonic()
    time.sleep(IDLE_BASELINE_S)
    idle_rate = (busy_seconds() - before) / (time.monotonic() - started)
    before, started = busy_seconds(), time.monotonic()
    end = traffic._iperf(vm1, lanhost.ns, lanhost.ip, seconds, extra)
    spent = busy_seconds() - before - idle_rate * (time.monotonic() - started)
    received = end["sum_received"]["bytes"] if kind == "tcp" else end["sum"]["bytes"] * (1 - end["sum"]["lost_percent"] / 100)
    return max(spent, 0.0), received


def measure(rounds: int, seconds: int, workdir: Path, say) -> dict:
    per_round = []
    for r in range(rounds):
        results = {}
        for setup in random.Random(100 + r).sample(setups.SETUPS, len(setups.SETUPS)):
            with setups.active(setup, workdir):
                results[setup.key] = {}
                for name, kind, reverse in FLOWS:
                    spent, received = transfer(kind, reverse, seconds)
                    results[setup.key][name] = spent / (received / 1e9) if received else float("nan")
        say(f"   cpu round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v['tcp_up']:.2f}" for k, v in sorted(results.items())) + " CPU-s/GB (TCP VM->LAN)")
        per_round.append(results)
    summary = {}
    for setup in setups.SETUPS:
        summary[setup.key] = {"title": setup.title}
        for name, _, _ in FLOWS:
            values = [rnd[setup.key][name] for rnd in per_round]
            ratios = [rnd[setup.key][name] / rnd["a"][name] for rnd in per_round if rnd["a"][name] > 0]
            summary[setup.key][name] = {"median": statistics.median(values),
                                        "ratio": statistics.median(ratios) if ratios else float("nan"),
                                        "spread": (min(ratios), max(ratios)) if ratios else (float("nan"),) * 2}
    return {"rounds": rounds, "seconds": seconds, "clock": CLOCK, "setups": summary}
