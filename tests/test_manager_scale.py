"""The manager's cost with full tables, as a bound on bpf(2) calls (not a timing): 65,536 bindings,
4,096 VM MACs and 4,096 LAN MACs in the real maps of a compiled datapath (macnat.harness's
namespace), and every periodic duty run as the manager's loop runs them."""

from __future__ import annotations

import ipaddress
import time

import pytest
from pyroute2 import IPRoute

from macnat import bpfsys, config, constants, netns
from macnat.harness import Harness
from macnat.clock import monotonic_ns
from macnat.manager.duties import all_duties, ageing, bindings_log, claims, lan_fdb, port_accounting, vm_fdb
from macnat.manager.state import State
from macnat.maps import Binding, IpAddr, LanMac, MacAddr, VmMac, mac_bytes
from macnat.netlink import Link

# A steady tick with full tables may cost this many bpf(2) calls at most: a few counter lookups and,
# when an ageing sweep is due, one BPF_MAP_LOOKUP_BATCH per 4,096 elements of each table.
SWEEP_CALLS = 65536 // 4096 + 4096 // 4096 + 8


class HarnessDatapath:
    def __init__(self, harness: Harness):
        self.maps = harness.maps
        self.programs = harness.fds


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    harness = Harness(f"{netns.PREFIX}test-scale", "02:4d:4e:00:00:0a")
    now = monotonic_ns()
    fresh = Binding(mac=mac_bytes("52:54:00:ff:00:01"), last_seen_ns=now)
    base4, base6 = int(ipaddress.IPv4Address("10.0.0.0")), int(ipaddress.IPv6Address("fd00:1::"))
    for i in range(constants.MAX_BINDINGS):
        key = IpAddr.from_buffer_copy(bytes(10) + b"\xff\xff" + ipaddress.IPv4Address(base4 + i).packed) if i % 2 \
            else IpAddr.from_buffer_copy(ipaddress.IPv6Address(base6 + i).packed)
        harness.maps.bindings.update(key, fresh)
    for i in range(constants.MAX_VM_MACS):
        harness.maps.vm_macs.update(MacAddr(mac_bytes(f"52:54:00:fe:{i >> 8:02x}:{i & 255:02x}")), VmMac(now))
    for i in range(constants.MAX_LAN_MACS):
        harness.maps.lan_macs.update(MacAddr(mac_bytes(f"02:4c:00:00:{i >> 8:02x}:{i & 255:02x}")), LanMac(now))
    with harness.ns.entered():
        ipr = IPRoute()
    index = harness.ifindex
    resolved = config.resolve("wifi0", {"bridge": "br0"}, path=tmp_path_factory.mktemp("cfg") / "none.toml", environ={})
    state = State("wifi0", resolved, HarnessDatapath(harness), ipr,
                  wifi=Link(index["wifi0"], "wifi0", "02:4d:4e:00:00:0a", "veth", None, 1500, up=True, carrier=True),
                  bridge=Link(index["br0"], "br0", "02:4d:4e:00:00:b0", "bridge", None, 1500, up=True, carrier=True),
                  uplink=Link(index["up0"], "up0", "02:00:00:00:00:01", "veth", index["br0"], 1500, up=True, carrier=True))
    yield harness, state
    ipr.close()
    harness.close()


def calls_of(action) -> int:
    before = sum(bpfsys.calls.values())
    action()
    return sum(bpfsys.calls.values()) - before


def test_the_tables_are_full(full):
    harness, _ = full
    assert harness.maps.bindings.snapshot().count == constants.MAX_BINDINGS
    assert harness.maps.vm_macs.snapshot().count == constants.MAX_VM_MACS
    assert harness.maps.lan_macs.snapshot().count == constants.MAX_LAN_MACS


def test_a_steady_tick_reads_no_table(full):
    """Nothing learned, nothing refused: the once-a-second duties look at their counters only."""
    _, state = full
    duties = [bindings_log.BindingsLog(), claims.Claims(), vm_fdb.VmFdb(), port_accounting.PortAccounting(),
              lan_fdb.LanFdb()]
    for duty in duties:
        duty.run(time.monotonic(), state)  # the first run reads the tables once
    assert calls_of(lambda: [duty.run(time.monotonic(), state) for duty in duties]) <= 9


def test_an_ageing_sweep_of_full_tables_is_a_few_batch_calls(full):
    _, state = full
    duty = ageing.Ageing()
    duty.interval = 30.0
    assert calls_of(lambda: duty.run(time.monotonic(), state)) <= SWEEP_CALLS
    assert state.bindings == constants.MAX_BINDINGS
    assert duty.next_at > time.monotonic() + 60, "nothing can be idle before its age allows: no sweep till then"


def test_the_lan_fdb_reads_a_full_table_only_when_a_lan_mac_was_learned_or_to_age_it(full):
    _, state = full
    duty = lan_fdb.LanFdb()
    duty.run(time.monotonic(), state)  # installs 4,096 FDB entries (netlink, not bpf)
    assert len(duty.installed) == constants.MAX_LAN_MACS
    assert calls_of(lambda: duty.run(time.monotonic(), state)) == 1, "the learned_lan_mac counter only"
    duty.learned -= 1  # as if the datapath had noted a new LAN MAC since
    assert calls_of(lambda: duty.run(time.monotonic(), state)) <= 3, "the counter and one or two batch calls"
    assert calls_of(lambda: duty.run(time.monotonic() + state.settings.age / 10, state)) <= 3, "due to age"


def test_every_duty_timer_at_once_stays_within_the_bound(full):
    _, state = full
    duties = [d for d in all_duties() if type(d).__name__ not in ("Notify", "StatusFile", "Plumbing", "LanSide")]
    for duty in duties:
        if duty.due() is not None:
            duty.on_timer(time.monotonic(), state)
    assert calls_of(lambda: [d.on_timer(time.monotonic(), state) for d in duties if d.due() is not None]) \
        <= SWEEP_CALLS + 8
