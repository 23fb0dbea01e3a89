"""The events ring buffer and its reader (bpfsys.RingBuffer: mmap of the map's fd, no bcc): records
decoded field by field as the datapath wrote them, in order, across the ring's wrap-around, and what
happens when the manager does not read."""

from __future__ import annotations

import pytest
from scapy.all import ARP, Ether

from macnat import bpfsys, constants, maps, netns
from macnat.harness import TC_ACT_SHOT, VM_PORT, Harness
from macnat.clock import monotonic_ns
from macnat.maps import Event, ip_str, mac_str

WIFI_MAC, VM_MAC, OWNER_MAC = "02:4d:4e:00:00:0a", "52:54:00:00:01:01", "52:54:00:00:01:02"
RECORD = bpfsys.RingBuffer.HEADER_SIZE + (maps.ctypes.sizeof(Event) + 7) // 8 * 8  # one event in the ring
PER_PORT = constants.PORT_EVENTS_PER_SECOND


@pytest.fixture(scope="module")
def harness():
    h = Harness(f"{netns.PREFIX}test-ev", WIFI_MAC)
    yield h
    h.close()


@pytest.fixture
def dp(harness):
    harness.reset()
    return harness


def refused(dp, n: int, first_port: int = 5000) -> None:
    """n refused_address events, each with its own address 127.x.y.z, spread over ports within their rate."""
    for i in range(n):
        frame = bytes(Ether(src=VM_MAC, dst="ff:ff:ff:ff:ff:ff")
                      / ARP(op=1, hwsrc=VM_MAC, psrc=f"127.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", pdst="10.0.0.1"))
        assert dp.run("uplink_egress", frame, first_port + i // PER_PORT).retval == TC_ACT_SHOT


def numbers(events) -> list[int]:
    return [int.from_bytes(bytes(e.ip)[13:], "big") for e in events]


def test_the_ring_is_the_map_the_datapath_writes(dp):
    ring = bpfsys.RingBuffer(dp.maps.rings["events"])
    assert ring.size == constants.EVENT_RING_BYTES
    ring.close()
    with pytest.raises(bpfsys.BpfError):
        bpfsys.RingBuffer(dp.maps.bindings.fd)


def test_an_event_reads_back_field_by_field(dp):
    dp.bind("192.168.77.101", OWNER_MAC, port=VM_PORT + 1)
    claim = bytes(Ether(src=VM_MAC, dst="ff:ff:ff:ff:ff:ff")
                  / ARP(op=1, hwsrc=VM_MAC, psrc="192.168.77.101", pdst="192.168.77.101"))
    start = monotonic_ns()  # the datapath's clock
    dp.run("uplink_egress", claim, VM_PORT)
    (event,) = list(dp.maps.events())
    assert (event.kind_name, event.port, mac_str(event.mac), mac_str(event.other), ip_str(event.ip)) == \
        ("refused_claim", VM_PORT, VM_MAC, OWNER_MAC, "192.168.77.101")
    assert start <= event.time_ns <= monotonic_ns() + 10**7 and event.port_suppressed == 0
    assert list(dp.maps.events()) == [], "read once"


def test_records_come_in_order_across_the_wrap_around(dp):
    capacity = (constants.EVENT_RING_BYTES - 1) // RECORD  # a record must not fill the ring to the byte
    first = capacity * 2 // 3
    refused(dp, first)
    assert numbers(dp.maps.events()) == list(range(first))
    refused(dp, first, first_port=6000)  # crosses the end of the data area
    assert numbers(dp.maps.events()) == list(range(first))
    assert dp.maps.counter_totals()["events_lost"] == 0


def test_a_full_ring_loses_the_newest_events_and_counts_them(dp):
    lost_before = dp.maps.counter_totals()["events_lost"]
    capacity = (constants.EVENT_RING_BYTES - 1) // RECORD  # a record must not fill the ring to the byte
    refused(dp, capacity + 30, first_port=7000)
    assert dp.maps.counter_totals()["events_lost"] - lost_before == 30
    assert numbers(dp.maps.events()) == list(range(capacity)), "the oldest are kept, in order"
    refused(dp, 1, first_port=9000)
    assert numbers(dp.maps.events()) == [0], "room again once read"
