"""The manager at scale: what a running manager costs with 10, 1,000 and 65,536 bindings (at the
largest also 4,096 VM MACs and 4,096 LAN MACs, so every table is full), each held for a while:
its CPU time from the scheduler (/proc/PID/task/*/schedstat, as a share of one core) and its resident memory;
how long one ageing sweep of those tables takes; and how long `macnat table --json` and
`macnat stats --json` take, start to finish, as a user runs them.

The bindings are written straight into the running datapath's maps, fresh (so they stay while they
are measured, as a busy LAN's would), the way the datapath would have learned them.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import statistics
import subprocess
import time
from pathlib import Path

from macnat import bpfsys, config, constants, lab
from macnat.clock import monotonic_ns
from macnat.datapath import Datapath
from macnat.manager.duties import ageing
from macnat.manager.state import State
from macnat.maps import Binding, IpAddr, LanMac, MacAddr, VmMac, mac_bytes, u32
from macnat.netlink import Link

SIZES = (10, 1000, constants.MAX_BINDINGS)


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads, in nanoseconds from the scheduler (schedstat's first field)
    rather than /proc/PID/stat's 1/100 s: an idle manager uses a few milliseconds a minute."""
    return sum(int(path.read_text().split()[0]) for path in Path(f"/proc/{pid}/task").glob("*/schedstat")) / 1e9


def resident_mb(pid: int) -> dict[str, float]:
    """The process's resident memory in MB: all of it (VmRSS), and its parts: anonymous (the heap, the
    stacks: what it allocated) and file-backed (the pages of its programs and libraries it has run)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[field].split()[0]) / 1024
            for name, field in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}


def rss_mb(pid: int) -> float:
    return resident_mb(pid)["rss"]


def fill(maps, bindings: int, full_mac_tables: bool) -> None:
    """`bindings` bindings (or up to full: the lab's VMs may be learned meanwhile), and at the largest size
    the VM and LAN MAC tables full too (the lab's own VMs already have a few entries)."""
    maps.bindings.clear()
    now = monotonic_ns()
    base4, base6 = int(ipaddress.IPv4Address("10.0.0.0")), int(ipaddress.IPv6Address("fd00:1::"))

    def binding(i: int) -> tuple:
        mac = mac_bytes(f"52:54:00:fd:{(i % 64) >> 8:02x}:{i % 64:02x}")  # 64 VMs share them
        key = IpAddr.from_buffer_copy(bytes(10) + b"\xff\xff" + ipaddress.IPv4Address(base4 + i).packed) if i % 2 \
            else IpAddr.from_buffer_copy(ipaddress.IPv6Address(base6 + i).packed)
        return key, Binding(mac=mac, last_seen_ns=now)

    insert_until_full(maps.bindings, (binding(i) for i in range(bindings)))
    if full_mac_tables:
        for table, prefix, size, value in ((maps.vm_macs, "52:54:00:fe", constants.MAX_VM_MACS, VmMac(now)),
                                           (maps.lan_macs, "02:4c:00:00", constants.MAX_LAN_MACS, LanMac(now))):
            insert_until_full(table, ((MacAddr(mac_bytes(f"{prefix}:{i >> 8:02x}:{i & 255:02x}")), value)
                                      for i in range(size)))
        count(maps, "learned_lan_mac", constants.MAX_LAN_MACS)


def count(maps, name: str, n: int) -> None:
    """Add `n` to a datapath counter, as the datapath counts what it learns (the manager looks at the
    tables when their counters move)."""
    counters, key = maps.by_name["counters"], u32(constants.COUNTER_INDEX[name])
    per_cpu = counters.lookup(key)
    per_cpu[0] += n
    counters.update(key, per_cpu)


def insert_until_full(table, items) -> None:
    for key, value in items:
        try:
            table.update(key, value)
        except bpfsys.BpfError as exc:
            if exc.errno != errno.E2BIG:
                raise
            return


def timed(*args: str, runs: int = 3) -> float:
    """Median wall time of a `macnat` command, start to finish, as a user at the shell waits for it."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(lab.LAPTOP.ns.exec_argv(lab.MACNAT, *args), check=True, capture_output=True, timeout=120)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def sweep_seconds(datapath: Datapath, rounds: int = 3) -> float:
    """One ageing sweep of the tables as they are, by the manager's own duty, in this process."""
    resolved = config.resolve("wlan0", {"bridge": "vmbr0"}, path=Path("/nonexistent"), environ={})
    wifi = Link(0, "wlan0", lab.LAPTOP.mac, "veth", None, 1500, up=True, carrier=True)
    state = State("wlan0", resolved, datapath, ipr=None, wifi=wifi)
    times = []
    for _ in range(rounds):
        duty = ageing.Ageing()
        duty.interval = ageing.Ageing.probe_interval(state)
        started = time.monotonic()
        duty.run(time.monotonic(), state)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def measure(seconds: float, workdir: Path) -> dict:
    lab.up()
    manager = lab.RunningManager(log=workdir / "scale.log")
    pid = manager.proc.pid  # `macnat attach` execs the manager: the same PID
    (found,) = json.loads(lab.macnat("status", "--json").stdout)
    datapath = Datapath.from_ids(found["programs"])
    results = {}
    try:
        for size in SIZES:
            fill(datapath.maps, size, full_mac_tables=size == max(SIZES))
            time.sleep(3)  # the manager installs the LAN MACs' FDB entries, then is steady
            before, started = cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            cpu = (cpu_seconds(pid) - before) / (time.monotonic() - started) * 100
            results[size] = {"cpu_percent": cpu, "rss_mb": rss_mb(pid), "sweep_s": sweep_seconds(datapath),
                             "table_s": timed("table", "--json"), "stats_s": timed("stats", "--json")}
    finally:
        datapath.close()
        manager.stop()
        lab.down()
    return {"seconds": seconds, "sizes": results}
