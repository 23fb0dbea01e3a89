"""Time spent inside macnat's programs under real traffic, by the kernel's own accounting
(BPF_ENABLE_STATS: run_time_ns and run_cnt of each program), while the lab moves TCP and UDP both ways
through macnat at the fixed rates of the CPU-per-byte measurement.

BPF_PROG_TEST_RUN (section 1) runs a program on one hot buffer on one CPU. Real frames bring what it
cannot: caches the stack has just used, two CPUs updating one binding (a TCP sender's data and its
ACKs), and wlan0's egress program running a second time for every frame uplink_egress redirected
there. Unlike throughput, time inside the programs per run hardly depends on the scheduler.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from macnat import bpfsys, lab
from macnat.bench import cpu, setups

FLOOR_RUNS = 100_000


def attached_programs() -> dict[str, int]:
    """The running attachment's programs in the lab, name -> ID (from `macnat status --json`)."""
    described = json.loads(lab.macnat("status", "--json").stdout)
    return described[0]["programs"]


def totals(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of each program so far."""
    found = {}
    for name, fd in fds.items():
        info, _ = bpfsys.prog_info(fd)
        found[name] = (info.run_time_ns, info.run_cnt)
    return found


def accounting_floor_ns() -> float:
    """What the kernel's timing reports per run for a program that does nothing (its own clock reads):
    a program that returns at once, run by BPF_PROG_TEST_RUN (which does not transmit) with the stats on."""
    fd = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_SCHED_CLS, bpfsys.RETURN_OK, "macnat_floor")
    try:
        bpfsys.prog_test_run(fd, bytes(64), repeat=FLOOR_RUNS)
        info, _ = bpfsys.prog_info(fd)
        return info.run_time_ns / info.run_cnt
    finally:
        os.close(fd)


def measure(rounds: int, seconds: int, workdir: Path) -> dict:
    """ns per run of each program, and per byte delivered, for each flow of cpu.FLOWS: medians over rounds."""
    stats_fd = bpfsys.enable_run_time_stats()
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        with setups.active(setups.Macnat(), workdir):
            fds = {name: bpfsys.prog_fd_by_id(prog_id) for name, prog_id in attached_programs().items()}
            try:
                for _ in range(rounds):
                    for flow, kind, reverse in cpu.FLOWS:
                        before = totals(fds)
                        _, received = cpu.transfer(kind, reverse, seconds)
                        after = totals(fds)
                        per = samples.setdefault(flow, {})
                        spent = 0
                        for name in fds:
                            ns, runs = (a - b for a, b in zip(after[name], before[name]))
                            spent += ns
                            if runs:
                                per.setdefault(name, []).append(ns / runs)
                        per.setdefault("ns_per_kb", []).append(spent / (received / 1000) if received else float("nan"))
            finally:
                for fd in fds.values():
                    os.close(fd)
        floor_ns = accounting_floor_ns()
    finally:
        os.close(stats_fd)
    return {"rounds": rounds, "seconds": seconds, "floor_ns": floor_ns,
            "flows": {flow: {name: statistics.median(values) for name, values in per.items()}
                      for flow, per in samples.items()}}

