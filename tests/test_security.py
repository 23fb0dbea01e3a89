"""Hostile VMs and hostile frames (issue #12), packet by packet through BPF_PROG_TEST_RUN: every attack
the issue found reproducible, each a named regression test asserting return codes, exact bytes,
counters, table contents and events. The lab's version of the same attacks is tests/test_hostile.py."""

from __future__ import annotations

import ipaddress
import struct
import time

import pytest
from scapy.all import ARP, BOOTP, DHCP, ICMP, IP, UDP, Dot1AD, Dot1Q, Ether, Raw
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptMTU, ICMPv6NDOptSrcLLAddr,
                                IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.layers.l2 import LLC, SNAP, Dot3

from macnat import constants, maps, netns
from macnat.harness import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VM_PORT, Harness
from macnat import config
from macnat.frames import internet_checksum
from macnat.clock import monotonic_ns
from macnat.manager.duties.claims import Claims
from macnat.manager.duties.lan_side import age_lan_addresses, pin_gateway, sync_onlink_prefixes
from macnat.manager.duties.port_accounting import age_dhcp_requests, write_released_counts
from macnat.manager.duties.security_log import SecurityLog
from macnat.manager.duties.vm_ports import release_gone_ports
from macnat.manager.state import State
from macnat.maps import ip_key, ip_str, mac_bytes, mac_str

WIFI_MAC, VM_MAC, VM2_MAC = "02:4d:4e:00:00:0a", "52:54:00:00:01:01", "52:54:00:00:01:02"
GATEWAY_MAC, LAN_MAC = "02:4d:4e:00:00:01", "02:4d:4e:00:00:14"
HOST_IP, GATEWAY_IP, VM_IP, VM2_IP, LAN_IP = "192.168.77.10", "192.168.77.1", "192.168.77.101", "192.168.77.102", \
    "192.168.77.20"
HOST_IP6, VM_IP6, VM2_IP6, LAN_IP6 = "fd77:77::10", "fd77:77::5054:ff:fe00:101", "fd77:77::5054:ff:fe00:102", \
    "fd77:77::20"
VM_LL6 = "fe80::5054:ff:fe00:101"
PORT2 = VM_PORT + 1  # another VM's bridge port
BROADCAST = "ff:ff:ff:ff:ff:ff"
ONLINK = {ipaddress.ip_network("192.168.77.0/24"), ipaddress.ip_network("fd77:77::/64")}


@pytest.fixture(scope="module")
def harness():
    h = Harness(f"{netns.PREFIX}test-sec", WIFI_MAC)
    yield h
    h.close()


@pytest.fixture
def dp(harness):
    harness.set_wifi_mac(WIFI_MAC)  # flags and limits back to their defaults
    harness.reset(host_addresses=(HOST_IP, HOST_IP6))
    return harness


def manager_state(dp) -> State:
    """The manager's shared facts over the harness's maps, for its duties (no netlink needed)."""
    resolved = config.resolve("wifi0", {"bridge": "br0"}, path=config.Path("/nonexistent"), environ={})

    class HarnessDatapath:
        maps, programs = dp.maps, dp.fds

    return State("wifi0", resolved, HarnessDatapath(), ipr=None, host_addresses={HOST_IP: "wlan0"})


@pytest.fixture
def lan(dp):
    """The datapath as a running manager keeps it: the gateway pinned, the on-link prefixes known."""
    pin_gateway(dp.maps, GATEWAY_IP, GATEWAY_MAC, now_ns=1)
    sync_onlink_prefixes(dp.maps, ONLINK)
    return dp


def from_vm(dp, frame, port=VM_PORT):
    return dp.run("uplink_egress", bytes(frame), port)


def bound(dp, ip) -> str | None:
    b = dp.binding(ip)
    return mac_str(b.mac) if b else None


def vm_macs(dp) -> dict[str, int]:
    return {mac_str(k.addr): v.port for k, v in dp.maps.vm_macs.items()}


def tables(dp) -> dict:
    """Everything a frame may teach the datapath, for comparing before and after."""
    return {name: {bytes(k): bytes(v) for k, v in dp.maps.by_name[name].items()}
            for name in ("bindings", "vm_macs", "lan_macs", "lan_addrs", "dhcp_requests")}


def events(dp) -> list[tuple[str, int, str, str, str]]:
    return [(e.kind_name, e.port, mac_str(e.mac), mac_str(e.other), ip_str(e.ip)) for e in dp.maps.events()]


def arp(src_mac, psrc, op=1, pdst=GATEWAY_IP, hwsrc=None, hwdst="00:00:00:00:00:00", dst=BROADCAST):
    return Ether(src=src_mac, dst=dst) / ARP(op=op, hwsrc=hwsrc or src_mac, psrc=psrc, hwdst=hwdst, pdst=pdst)


# ---- each VM is only itself: MACs ------------------------------------------------------------------

def test_gateway_mac_as_a_vm_source_is_refused_and_the_host_still_reaches_the_gateway(lan):
    """Was: one frame from a VM with the gateway's MAC as source made it a "VM MAC": wifi_egress diverted
    the host's traffic for the gateway into the bridge, and the gateway's broadcasts stopped reaching
    the VMs."""
    run = from_vm(lan, Ether(src=GATEWAY_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / ICMP())
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_mac_lan": 1}
    assert GATEWAY_MAC not in vm_macs(lan) and bound(lan, VM_IP) is None
    host_to_gateway = bytes(Ether(src=WIFI_MAC, dst=GATEWAY_MAC) / IP(src=HOST_IP, dst="8.8.8.8") / ICMP())
    run = lan.run("wifi_egress", host_to_gateway)
    assert run.retval == TC_ACT_OK and run.data == host_to_gateway and run.moved == {}
    gateway_broadcast = bytes(arp(GATEWAY_MAC, GATEWAY_IP, pdst=VM_IP))
    assert lan.run("wifi_ingress", gateway_broadcast).moved == {"group_to_vms": 1}
    assert ("refused_mac_lan", VM_PORT, GATEWAY_MAC, "00:00:00:00:00:00", "::") in events(lan)


def test_a_lan_mac_seen_in_arp_from_wifi_is_refused_as_a_vm_source(dp):
    dp.run("wifi_ingress", bytes(arp(LAN_MAC, LAN_IP, pdst=HOST_IP)))
    run = from_vm(dp, arp(LAN_MAC, VM_IP))
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_mac_lan": 1}
    assert LAN_MAC not in vm_macs(dp)


def test_wifi_mac_as_a_vm_source_is_refused_and_vms_still_reach_the_host(dp):
    """Was: one frame with wlan0's own MAC as source made every VM's frames to the host drop as VM-to-VM."""
    run = from_vm(dp, arp(WIFI_MAC, VM2_IP))
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_mac_wifi": 1}
    assert WIFI_MAC not in vm_macs(dp)
    run = from_vm(dp, Ether(src=VM_MAC, dst=WIFI_MAC) / IP(src=VM_IP, dst=HOST_IP) / ICMP())
    assert run.retval == TC_ACT_REDIRECT and run.moved["vm_to_host"] == 1


def test_a_vm_mac_belongs_to_the_port_it_was_first_seen_on(dp):
    assert from_vm(dp, arp(VM_MAC, VM_IP), port=VM_PORT).retval == TC_ACT_REDIRECT
    for frame in (arp(VM_MAC, VM_IP), Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / ICMP(),
                  Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=VM_IP6, dst=LAN_IP6) / ICMPv6EchoRequest()):
        run = from_vm(dp, frame, port=PORT2)  # the fast path too: the binding's MAC matches, its port does not
        assert run.retval == TC_ACT_SHOT and run.moved == {"refused_mac_port": 1}
    assert vm_macs(dp) == {VM_MAC: VM_PORT} and dp.binding(VM_IP).port == VM_PORT and bound(dp, VM_IP6) is None


def test_a_released_port_lets_its_vm_come_back_on_a_new_port(dp):
    from_vm(dp, arp(VM_MAC, VM_IP), port=VM_PORT)
    assert release_gone_ports(dp.maps, present={PORT2}) == {VM_PORT: [VM_MAC]}
    assert vm_macs(dp) == {} and bound(dp, VM_IP) is None
    assert dp.maps.ports.lookup(maps.u32(VM_PORT)) is None
    assert from_vm(dp, arp(VM_MAC, VM_IP), port=PORT2).moved == {"vm_to_wifi": 1, "learned_mac": 1, "learned_ip": 1}
    assert vm_macs(dp) == {VM_MAC: PORT2}


def test_a_static_vms_mac_goes_to_the_first_port_that_uses_it(dp):
    dp.bind(VM_IP, VM_MAC, flags=constants.BINDING_STATIC, port=0)
    assert from_vm(dp, Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / ICMP()).retval == TC_ACT_REDIRECT
    assert vm_macs(dp) == {VM_MAC: VM_PORT} and dp.binding(VM_IP).port == VM_PORT
    run = from_vm(dp, arp(VM_MAC, VM_IP), port=PORT2)
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_mac_port": 1}


# ---- per-port limits -------------------------------------------------------------------------------

def ipv6_flood(count: int, mac: str = VM_MAC):
    for i in range(count):
        yield Ether(src=mac, dst=LAN_MAC) / IPv6(src=f"fd77:77::f:{i:x}", dst=LAN_IP6) / ICMPv6EchoRequest()


def test_one_vm_flooding_ipv6_sources_cannot_starve_the_others(dp):
    """Was: 70,000 spoofed IPv6 sources filled `bindings`; other VMs' new addresses and DHCPACKs were then
    dropped as table full. Now the port stops at its limit, synchronously, and keeps what it has."""
    limit = constants.PORT_MAX_IPV6
    results = [from_vm(dp, frame).retval for frame in ipv6_flood(limit + 20)]
    assert results == [TC_ACT_REDIRECT] * limit + [TC_ACT_SHOT] * 20
    assert dp.maps.counter_totals()["refused_limit_ipv6"] == 20
    assert len(list(dp.maps.bindings.keys())) == limit
    run = from_vm(dp, Ether(src=VM2_MAC, dst=LAN_MAC) / IPv6(src=VM2_IP6, dst=LAN_IP6) / ICMPv6EchoRequest(), PORT2)
    assert run.retval == TC_ACT_REDIRECT and run.moved["learned_ip"] == 1
    assert from_vm(dp, next(ipv6_flood(1))).retval == TC_ACT_REDIRECT, "what the port has stays"
    assert ("refused_limit_ipv6", VM_PORT, VM_MAC, "00:00:00:00:00:00", f"fd77:77::f:{limit:x}") in events(dp)


def test_one_vm_flooding_source_macs_cannot_lock_out_a_new_vm(dp):
    """Was: about 4,200 spoofed source MACs filled `vm_macs`; a newly started VM's first frame was dropped."""
    macs = [f"52:54:00:aa:{i // 256:02x}:{i % 256:02x}" for i in range(constants.PORT_MAX_MACS + 10)]
    results = [from_vm(dp, Ether(src=mac, dst=BROADCAST) / ARP(op=1, hwsrc=mac, psrc="0.0.0.0", pdst=LAN_IP)).retval
               for mac in macs]
    assert results.count(TC_ACT_REDIRECT) == constants.PORT_MAX_MACS and results.count(TC_ACT_SHOT) == 10
    assert dp.maps.counter_totals()["refused_limit_macs"] == 10
    run = from_vm(dp, arp(VM2_MAC, VM2_IP), PORT2)
    assert run.retval == TC_ACT_REDIRECT and run.moved == {"vm_to_wifi": 1, "learned_mac": 1, "learned_ip": 1}


def test_limits_come_from_the_config_and_room_comes_back_with_the_managers_release(dp):
    dp.set_wifi_mac(WIFI_MAC, max_ipv4_per_port=2)
    assert [from_vm(dp, arp(VM_MAC, f"192.168.77.{150 + i}")).retval for i in range(3)] == \
        [TC_ACT_REDIRECT, TC_ACT_REDIRECT, TC_ACT_SHOT]
    dp.maps.bindings.delete(ip_key("192.168.77.150"))  # aged by the manager
    assert from_vm(dp, arp(VM_MAC, "192.168.77.152")).retval == TC_ACT_SHOT, "refused until the next sweep"
    held = write_released_counts(dp.maps)
    assert held[VM_PORT] == {"macs": 1, "ipv4": 1, "ipv6": 0, "dhcp_requests": 0}
    assert from_vm(dp, arp(VM_MAC, "192.168.77.152")).moved["learned_ip"] == 1


# ---- addresses a VM may claim ------------------------------------------------------------------------

BOGUS_SOURCES = ["127.0.0.1", "169.254.7.7", "0.1.2.3", "240.0.0.1", "224.0.0.5", "192.168.77.255", "192.168.77.0",
                 "192.0.2.2", "198.51.100.3", "203.0.113.4", "8.8.8.8"]
BOGUS_SOURCES6 = ["::1", "::ffff:0.0.0.0", "::ffff:255.255.255.255", "::ffff:224.0.0.1", "::ffff:192.168.77.102",
                  "::192.168.77.102", "2001:db8::1", "3fff::1", "2a00:1450::1"]


@pytest.mark.parametrize("source", BOGUS_SOURCES)
def test_implausible_ipv4_sources_are_refused_and_never_bound(lan, source):
    """Was: bindings for 8.8.8.8, 127.x, 169.254.x, 0.x, 240.x, the subnet broadcast, documentation addresses."""
    for frame in (Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=source, dst=LAN_IP) / UDP(sport=9, dport=9),
                  arp(VM_MAC, source)):
        before = tables(lan)
        run = from_vm(lan, frame)
        assert run.retval == TC_ACT_SHOT and run.moved == {"refused_address": 1}
        assert tables(lan) == before


@pytest.mark.parametrize("source", BOGUS_SOURCES6)
def test_implausible_ipv6_sources_are_refused_and_never_bound(lan, source):
    """Was: bindings for ::1 and 2001:db8::/32, and ::ffff: sources landing on the IPv4 keys."""
    lan.bind(VM2_IP, VM2_MAC, port=PORT2)
    before = tables(lan)
    run = from_vm(lan, Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=source, dst=LAN_IP6) / ICMPv6EchoRequest())
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_address": 1}
    assert tables(lan) == before and bound(lan, VM2_IP) == VM2_MAC


def allow(dp, flags: int) -> None:
    config = dp.maps.current_config()
    config.flags |= flags
    dp.maps.config.update(maps.u32(0), config)


def test_link_local_ipv4_when_the_config_allows_it_and_on_link_by_definition(lan):
    allow(lan, constants.CFG_ALLOW_IPV4_LINK_LOCAL)
    assert from_vm(lan, arp(VM_MAC, "169.254.7.7")).retval == TC_ACT_REDIRECT and bound(lan, "169.254.7.7") == VM_MAC


def test_documentation_prefixes_when_the_config_allows_them(dp):
    allow(dp, constants.CFG_ALLOW_DOCUMENTATION)
    assert from_vm(dp, arp(VM_MAC, "192.0.2.2")).retval == TC_ACT_REDIRECT
    assert from_vm(dp, Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src="2001:db8::1", dst=LAN_IP6)).retval == TC_ACT_REDIRECT
    assert bound(dp, "192.0.2.2") == bound(dp, "2001:db8::1") == VM_MAC


def test_without_known_prefixes_any_plausible_unicast_is_bound(dp):
    assert from_vm(dp, arp(VM_MAC, "10.1.2.3")).retval == TC_ACT_REDIRECT
    assert from_vm(dp, Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src="2a00:1450::1", dst=LAN_IP6)).retval == TC_ACT_REDIRECT
    assert from_vm(dp, Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=VM_LL6, dst=LAN_IP6)).retval == TC_ACT_REDIRECT


def test_gratuitous_arp_for_the_gateway_is_refused_not_forwarded(lan):
    """Was: a VM's gratuitous ARP for 192.168.77.1 made the LAN host's gateway entry point at the laptop,
    and the impostor received the LAN's gateway traffic."""
    run = from_vm(lan, arp(VM_MAC, GATEWAY_IP, pdst=GATEWAY_IP))
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_lan_ip": 1}
    assert bound(lan, GATEWAY_IP) is None and VM_MAC not in vm_macs(lan)
    refusal = lan.maps.refusals.lookup(ip_key(GATEWAY_IP))
    assert (mac_str(refusal.mac), refusal.reason, refusal.port) == \
        (VM_MAC, constants.COUNTER_INDEX["refused_lan_ip"], VM_PORT)
    assert ("refused_lan_ip", VM_PORT, VM_MAC, "00:00:00:00:00:00", GATEWAY_IP) in events(lan)


def test_an_address_the_lan_was_seen_using_is_refused(dp):
    dp.run("wifi_ingress", bytes(arp(LAN_MAC, LAN_IP, pdst=HOST_IP)))
    dp.run("wifi_ingress", bytes(Ether(src=LAN_MAC, dst="33:33:00:00:00:01") / IPv6(src=LAN_IP6, dst="ff02::1", hlim=255)
                                 / ICMPv6ND_NA(tgt=LAN_IP6, O=1) / ICMPv6NDOptSrcLLAddr(lladdr=LAN_MAC)))
    assert {ip_str(k) for k in dp.maps.lan_addrs.keys()} == {LAN_IP, LAN_IP6}
    assert from_vm(dp, arp(VM_MAC, LAN_IP)).moved == {"refused_lan_ip": 1}
    assert from_vm(dp, Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=LAN_IP6, dst=HOST_IP6)).moved == {"refused_lan_ip": 1}


def test_a_lan_host_using_a_vms_address_is_counted_and_the_binding_stays(dp):
    dp.bind(VM_IP, VM_MAC)
    run = dp.run("wifi_ingress", bytes(arp(LAN_MAC, VM_IP, pdst=HOST_IP)))
    assert run.moved == {"lan_ip_conflict": 1, "group_to_vms": 1, "learned_lan_mac": 1}
    assert bound(dp, VM_IP) == VM_MAC
    assert ("lan_ip_conflict", VM_PORT, LAN_MAC, VM_MAC, VM_IP) in events(dp)


# ---- moves between VMs ------------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    arp(VM2_MAC, VM_IP, pdst=VM_IP),                                                     # gratuitous ARP
    Ether(src=VM2_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / UDP(sport=53, dport=53),  # one spoofed datagram
], ids=["gratuitous-arp", "spoofed-udp"])
def test_another_vms_address_never_moves_on_an_ordinary_frame(dp, frame):
    """Was: a gratuitous ARP, or a single UDP packet with a spoofed source, moved another VM's address."""
    dp.bind(VM_IP, VM_MAC)
    run = from_vm(dp, frame, PORT2)
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_claim": 1}
    assert bound(dp, VM_IP) == VM_MAC and VM2_MAC not in vm_macs(dp)
    claim = dp.maps.refusals.lookup(ip_key(VM_IP))
    assert (mac_str(claim.mac), mac_str(claim.owner), claim.port, claim.count) == (VM2_MAC, VM_MAC, PORT2, 1)
    assert ("refused_claim", PORT2, VM2_MAC, VM_MAC, VM_IP) in events(dp)


def test_an_ipv6_source_mapping_another_vms_ipv4_does_not_move_it(dp):
    """Was: an IPv6 frame from ::ffff:<another VM's IPv4> moved that VM's IPv4 binding."""
    dp.bind(VM2_IP, VM2_MAC, port=PORT2)
    run = from_vm(dp, Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=f"::ffff:{VM2_IP}", dst=LAN_IP6) / ICMPv6EchoRequest())
    assert run.retval == TC_ACT_SHOT and run.moved == {"refused_address": 1}
    assert bound(dp, VM2_IP) == VM2_MAC and dp.binding(VM2_IP).port == PORT2


def test_a_dad_probe_for_another_vms_address_is_refused_but_goes_on(dp):
    dp.bind(VM_IP6, VM_MAC)
    probe = Ether(src=VM2_MAC, dst="33:33:ff:00:01:01") / IPv6(src="::", dst="ff02::1:ff00:101", hlim=255) \
        / ICMPv6ND_NS(tgt=VM_IP6)
    run = from_vm(dp, probe, PORT2)
    assert run.retval == TC_ACT_REDIRECT and run.moved["refused_claim"] == 1, "the owner must hear it to defend"
    assert bound(dp, VM_IP6) == VM_MAC


def dhcp_request(mac: str, xid: int) -> bytes:
    return bytes(Ether(src=mac, dst=BROADCAST) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
                 / BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[("message-type", "request"), "end"]))


def dhcp_ack(chaddr: str, yiaddr: str, xid: int, server_mac: str = GATEWAY_MAC) -> bytes:
    return bytes(Ether(src=server_mac, dst=BROADCAST) / IP(src=GATEWAY_IP, dst="255.255.255.255") / UDP(sport=67, dport=68)
                 / BOOTP(op=2, yiaddr=yiaddr, chaddr=mac_bytes(chaddr), xid=xid, flags=0x8000)
                 / DHCP(options=[("message-type", "ack"), ("server_id", GATEWAY_IP), "end"]))


def test_a_forged_dhcpack_without_a_matching_request_moves_nothing(dp):
    """Was: a forged broadcast DHCPACK from any LAN host moved one VM's address to another VM."""
    dp.bind(VM_IP, VM_MAC)
    dp.bind(VM2_IP, VM2_MAC, port=PORT2)
    for forged in (dhcp_ack(VM2_MAC, VM_IP, xid=0x4242, server_mac=LAN_MAC),   # no request at all
                   dhcp_ack(VM2_MAC, VM_IP, xid=0x1111, server_mac=LAN_MAC)):  # VM1's xid, VM2's chaddr
        from_vm(dp, dhcp_request(VM_MAC, 0x1111))
        run = dp.run("wifi_ingress", forged)
        assert run.retval == TC_ACT_OK and run.moved == {"dhcp_ack_unmatched": 1, "group_to_vms": 1}
        assert bound(dp, VM_IP) == VM_MAC


def test_a_dhcpack_answering_a_vms_own_request_moves_the_address_at_once(dp):
    dp.bind(VM_IP, VM_MAC)
    from_vm(dp, dhcp_request(VM2_MAC, 0x2222), PORT2)
    request = dp.maps.dhcp_requests.lookup(maps.u32(struct.unpack("=I", struct.pack("!I", 0x2222))[0]))
    assert (mac_str(request.mac), request.port) == (VM2_MAC, PORT2)
    run = dp.run("wifi_ingress", dhcp_ack(VM2_MAC, VM_IP, xid=0x2222))
    assert run.moved == {"moved_ip": 1, "group_to_vms": 1}
    assert bound(dp, VM_IP) == VM2_MAC and dp.binding(VM_IP).port == PORT2
    assert ("moved_ip", PORT2, VM2_MAC, VM_MAC, VM_IP) in events(dp)


def test_another_vms_recent_request_keeps_its_xid(dp):
    from_vm(dp, dhcp_request(VM_MAC, 0x3333))
    run = from_vm(dp, dhcp_request(VM2_MAC, 0x3333), PORT2)  # VM2 saw VM1's broadcast and reuses its xid
    assert run.retval == TC_ACT_REDIRECT and run.moved["dhcp_untracked"] == 1
    assert dp.run("wifi_ingress", dhcp_ack(VM2_MAC, VM2_IP, xid=0x3333)).moved["dhcp_ack_unmatched"] == 1
    assert dp.run("wifi_ingress", dhcp_ack(VM_MAC, VM_IP, xid=0x3333)).moved["learned_ip"] == 1


def test_a_dhcpack_overrides_an_unpinned_lan_address_but_not_the_gateway(lan):
    lan.run("wifi_ingress", bytes(arp(LAN_MAC, "192.168.77.150", pdst=HOST_IP)))
    from_vm(lan, dhcp_request(VM_MAC, 0x5555))
    assert lan.run("wifi_ingress", dhcp_ack(VM_MAC, "192.168.77.150", xid=0x5555)).moved["learned_ip"] == 1
    assert lan.maps.lan_addrs.lookup(ip_key("192.168.77.150")) is None
    assert lan.run("wifi_ingress", dhcp_ack(VM_MAC, GATEWAY_IP, xid=0x5555)).moved["refused_lan_ip"] == 1
    assert bound(lan, GATEWAY_IP) is None


def test_a_lan_dad_probe_for_a_mapped_address_leaves_the_ipv4_binding(dp):
    """Was: a LAN host's DAD probe for ::ffff:<a VM's IPv4> deleted the VM's IPv4 binding."""
    dp.bind(VM_IP, VM_MAC)
    probe = Ether(src=LAN_MAC, dst="33:33:ff:4d:65:65") / IPv6(src="::", dst="ff02::1:ff4d:6565", hlim=255) \
        / ICMPv6ND_NS(tgt=f"::ffff:{VM_IP}")
    run = dp.run("wifi_ingress", bytes(probe))
    assert "dad_conflict" not in run.moved and bound(dp, VM_IP) == VM_MAC


@pytest.mark.parametrize("dst", [WIFI_MAC, "33:33:ff:00:01:02"], ids=["unicast-to-the-host", "cloned-multicast"])
def test_a_vms_dad_probe_reaching_wifi_ingress_is_no_lan_hosts(dp, dst):
    """A VM's frames reach wifi_ingress too (redirected or cloned to the host): its DAD probe for another
    VM's address must not count as a LAN host's, which would drop that VM's binding."""
    dp.bind(VM_IP6, VM_MAC)
    dp.bind(VM2_IP6, VM2_MAC, port=PORT2)
    probe = Ether(src=VM_MAC, dst=dst) / IPv6(src="::", dst="ff02::1:ff00:102", hlim=255) / ICMPv6ND_NS(tgt=VM2_IP6)
    run = dp.run("wifi_ingress", bytes(probe))
    assert "dad_conflict" not in run.moved and bound(dp, VM2_IP6) == VM2_MAC


def test_ipv6_to_a_mapped_address_never_goes_by_the_ipv4_binding(dp):
    dp.bind(VM_IP, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IPv6(src=LAN_IP6, dst=f"::ffff:{VM_IP}") / ICMPv6EchoRequest())
    run = dp.run("wifi_ingress", frame)
    assert run.retval == TC_ACT_OK and run.data == frame and run.moved == {"wifi_to_host": 1}


# ---- nothing is learned from a dropped frame -------------------------------------------------------

def test_an_ns_with_a_zero_length_option_learns_nothing(dp):
    """Was: such an NS moved another VM's address to the sender, then was dropped as malformed."""
    dp.bind(VM2_IP6, VM2_MAC, port=PORT2)
    before = tables(dp)
    frame = Ether(src=VM_MAC, dst="33:33:ff:00:01:02") / IPv6(src=VM_IP6, dst="ff02::1:ff00:102", hlim=255) \
        / ICMPv6ND_NS(tgt=VM2_IP6) / Raw(bytes([1, 0]) + bytes(mac_bytes(VM_MAC)))
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_malformed": 1}
    assert tables(dp) == before


# ---- every frame is parsed the way the receiver will parse it --------------------------------------

def ll_option_macs(frame: bytes, options_offset: int) -> list[str]:
    """MACs of the link-layer address options from options_offset (a frame offset) to the IPv6 payload's end."""
    end = 14 + 40 + struct.unpack("!H", frame[18:20])[0]
    out, off = [], options_offset
    while off < end:
        kind, length = frame[off], frame[off + 1] * 8
        if kind in (1, 2):
            out.append(mac_str((maps.MacBytes)(*frame[off + 2:off + 8])))
        off += length
    return out


def icmpv6_checksum_ok(frame: bytes, icmp_offset: int, source: bytes, final_destination: bytes) -> bool:
    payload_end = 14 + 40 + struct.unpack("!H", frame[18:20])[0]
    icmp = frame[icmp_offset:payload_end]
    return internet_checksum(source + final_destination + struct.pack("!I3xB", len(icmp), 58) + icmp) == 0


NS_TO_LAN = ICMPv6ND_NS(tgt=LAN_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC)


@pytest.mark.parametrize("extension", [
    IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(),
    IPv6ExtHdrRouting(type=0, addresses=[], segleft=0),
], ids=["hop-by-hop", "destination-options", "both", "routing"])
def test_ndp_behind_extension_headers_is_rewritten(dp, extension):
    """Was: an NS or NA behind a hop-by-hop or destination options header left with the VM's MAC inside."""
    frame = bytes(Ether(src=VM_MAC, dst="33:33:ff:00:00:20") / IPv6(src=VM_IP6, dst="ff02::1:ff00:20", hlim=255)
                  / extension / NS_TO_LAN)
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_REDIRECT and run.moved["ndp_rewritten"] == 1
    icmp = len(frame) - len(NS_TO_LAN)
    assert ll_option_macs(run.data, icmp + 24) == [WIFI_MAC]
    assert run.data[12:icmp] == frame[12:icmp] and len(run.data) == len(frame)
    assert icmpv6_checksum_ok(run.data, icmp, ipaddress.ip_address(VM_IP6).packed,
                              ipaddress.ip_address("ff02::1:ff00:20").packed)


def test_fragmented_ndp_is_dropped(dp):
    frame = Ether(src=VM_MAC, dst="33:33:ff:00:00:20") / IPv6(src=VM_IP6, dst="ff02::1:ff00:20", hlim=255) \
        / IPv6ExtHdrFragment(m=1, offset=0) / NS_TO_LAN
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_malformed": 1}


@pytest.mark.parametrize("before", [8, 20, 62])
def test_a_link_layer_option_after_many_others_is_rewritten(dp, before):
    """Was: a link-layer option 9th or later left with the VM's MAC inside."""
    na = ICMPv6ND_NA(tgt=VM_IP6, O=1, S=0)
    frame = bytes(Ether(src=VM_MAC, dst="33:33:00:00:00:01") / IPv6(src=VM_IP6, dst="ff02::1", hlim=255) / na
                  / Raw(b"".join(bytes(ICMPv6NDOptMTU(mtu=1500)) for _ in range(before)))
                  / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC) / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC))
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_REDIRECT and run.moved["ndp_rewritten"] == 2
    assert ll_option_macs(run.data, 14 + 40 + 24) == [WIFI_MAC, WIFI_MAC]
    assert icmpv6_checksum_ok(run.data, 54, ipaddress.ip_address(VM_IP6).packed, ipaddress.ip_address("ff02::1").packed)


def test_ndp_with_more_options_than_the_walk_reads_is_dropped(dp):
    frame = Ether(src=VM_MAC, dst="33:33:00:00:00:01") / IPv6(src=VM_IP6, dst="ff02::1", hlim=255) \
        / ICMPv6ND_NA(tgt=VM_IP6) / Raw(bytes(ICMPv6NDOptMTU(mtu=1500)) * 64) / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC)
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_malformed": 1}


def test_ndp_options_in_the_ethernet_trailer_are_left_alone(dp):
    """Was: NDP options beyond the IPv6 payload length were rewritten (the ICMPv6 checksum broken)."""
    frame = bytes(Ether(src=VM_MAC, dst="33:33:ff:00:00:20") / IPv6(src=VM_IP6, dst="ff02::1:ff00:20", hlim=255)
                  / ICMPv6ND_NS(tgt=LAN_IP6)) + bytes(ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC))  # after the payload
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_REDIRECT and "ndp_rewritten" not in run.moved
    assert run.data[12:] == frame[12:]
    assert icmpv6_checksum_ok(run.data, 54, ipaddress.ip_address(VM_IP6).packed,
                              ipaddress.ip_address("ff02::1:ff00:20").packed)


def test_the_bootp_flag_is_not_set_beyond_the_udp_length(dp):
    """Was: the BOOTP flag was set beyond the UDP length."""
    full = dhcp_request(VM_MAC, 0x7777)
    ip_header = 14
    udp = ip_header + 20
    short = bytearray(full)
    short[udp + 4:udp + 6] = struct.pack("!H", 8 + 8)  # UDP length: 8 bytes of BOOTP, the flags outside
    short[ip_header + 2:ip_header + 4] = struct.pack("!H", 20 + 8 + 8)
    short[udp + 6:udp + 8] = b"\0\0"
    run = from_vm(dp, bytes(short))
    assert "dhcp_flag_set" not in run.moved and run.data[12:] == bytes(short)[12:]


@pytest.mark.parametrize("op", [0, 3, 4, 8, 25, 65535])
def test_arp_other_than_request_or_reply_is_dropped_and_teaches_nothing(dp, op):
    """Was: ARP with any op was rewritten and learned from."""
    run = from_vm(dp, arp(VM_MAC, VM_IP, op=op))
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_malformed": 1}
    assert vm_macs(dp) == {} and bound(dp, VM_IP) is None


def test_another_vms_mac_inside_arp_is_translated(dp):
    """Was: an ARP sender address that is another VM's MAC was left as is."""
    dp.bind(VM2_IP, VM2_MAC, port=PORT2)
    frame = bytes(arp(VM_MAC, VM_IP, op=2, hwsrc=VM2_MAC, hwdst=VM2_MAC, pdst=LAN_IP, dst=LAN_MAC))
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_REDIRECT
    pkt = Ether(run.data)
    assert (pkt.src, pkt[ARP].hwsrc, pkt[ARP].hwdst) == (WIFI_MAC, WIFI_MAC, WIFI_MAC)


def test_a_vms_mac_never_enters_lan_macs(dp):
    """Was: a VM's own MAC could end up in lan_macs, and with it a static FDB entry pointing it at the uplink."""
    dp.bind(VM_IP, VM_MAC)
    dp.bind(VM2_IP, VM2_MAC, port=PORT2)
    # A VM's unicast ARP to the station (redirected to wlan0's ingress) asking for another VM's address:
    dp.run("wifi_ingress", bytes(arp(VM_MAC, VM_IP, pdst=VM2_IP, dst=WIFI_MAC)))
    # the AP reflecting a translated broadcast, and a VM's NDP handed to the host:
    dp.run("wifi_ingress", bytes(arp(WIFI_MAC, VM_IP, pdst=LAN_IP)))
    dp.run("wifi_ingress", bytes(Ether(src=VM_MAC, dst=WIFI_MAC) / IPv6(src=VM_IP6, dst=HOST_IP6, hlim=255)
                                 / ICMPv6ND_NS(tgt=HOST_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC)))
    assert list(dp.maps.lan_macs.keys()) == [] and list(dp.maps.lan_addrs.keys()) == []


@pytest.mark.parametrize("frame", [
    Ether(src=VM_MAC, dst=BROADCAST) / Dot1Q(vlan=10) / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP, pdst=LAN_IP),
    Ether(src=VM_MAC, dst=BROADCAST) / Dot1AD(vlan=20) / Dot1Q(vlan=10) / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP),
    Ether(src=VM_MAC, dst=BROADCAST, type=0x9100) / Dot1Q(vlan=10) / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP),
], ids=["802.1q", "802.1ad", "qinq-9100"])
def test_vlan_tagged_vm_frames_are_dropped(dp, frame):
    """Was: 802.1Q/QinQ frames from VMs left with the outer source rewritten and the VM's MAC inside."""
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_vlan": 1}
    assert vm_macs(dp) == {}


def test_llc_snap_frames_from_vms_are_dropped(dp):
    frame = Dot3(src=VM_MAC, dst=BROADCAST) / LLC(dsap=0xAA, ssap=0xAA, ctrl=3) / SNAP(OUI=0, code=0x0806) \
        / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP, pdst=LAN_IP)
    run = from_vm(dp, frame)
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_llc": 1}


# ---- events -----------------------------------------------------------------------------------------

def test_events_are_rate_limited_per_port_and_the_rest_counted(dp):
    limit = constants.PORT_EVENTS_PER_SECOND
    suppressed = sum(from_vm(dp, arp(VM_MAC, f"127.0.0.{i + 1}")).moved.get("events_suppressed", 0)
                     for i in range(limit * 3))  # refused_address, an event each
    got = list(dp.maps.events())
    assert len(got) <= limit and all(e.kind_name == "refused_address" and e.port == VM_PORT for e in got)
    assert len(got) + suppressed == limit * 3 and suppressed >= limit * 2
    assert dp.maps.ports.lookup(maps.u32(VM_PORT)).events_suppressed == suppressed
    assert got[-1].port_suppressed <= suppressed, "an event tells the manager how many went before it"
    other = from_vm(dp, arp(VM2_MAC, "127.0.0.1"), PORT2)
    assert other.moved == {"refused_address": 1}
    assert [(e.kind_name, e.port) for e in dp.maps.events()] == [("refused_address", PORT2)], \
        "another port's events are not held back by the flood"


# ---- the manager's side, on the same harness -------------------------------------------------------

def test_a_claimed_address_moves_only_when_its_owner_does_not_answer(dp):
    dp.bind(VM_IP, VM_MAC)
    dp.bind(VM2_IP, VM2_MAC, port=PORT2)
    probed = []
    state = manager_state(dp)
    claims = Claims(answer_s=0.05)
    claims.prober.probe = lambda _state, ip, mac, source=None: probed.append((ip, mac_str(mac)))
    for ip in (VM_IP, VM2_IP):
        from_vm(dp, arp("52:54:00:00:01:09", ip, pdst=ip), port=PORT2 + 1)  # a third VM claims both
    claims.run(time.monotonic(), state)
    assert sorted(probed) == [(VM_IP, VM_MAC), (VM2_IP, VM2_MAC)]
    owner = dp.binding(VM2_IP)  # vm2 answers its probe: its binding is refreshed after the probe
    owner.last_seen_ns = monotonic_ns() + 10**9
    dp.maps.bindings.update(ip_key(VM2_IP), owner)
    time.sleep(0.06)
    claims.run(time.monotonic(), state)
    assert bound(dp, VM_IP) is None, "vm1 did not answer: released for the claimant's next frame"
    assert bound(dp, VM2_IP) == VM2_MAC
    assert from_vm(dp, arp("52:54:00:00:01:09", VM_IP, pdst=VM_IP), port=PORT2 + 1).moved["learned_ip"] == 1


def test_the_security_log_is_one_line_per_offender_and_kind_per_interval(dp, caplog):
    state = manager_state(dp)
    security = SecurityLog(interval_s=0.2)
    security.names = {VM_PORT: f"tap{VM_PORT}", PORT2: f"tap{PORT2}"}
    for i in range(50):  # one VM forging many sources: one offender, its port
        mac = f"52:54:00:bb:00:{i:02x}"
        from_vm(dp, arp(mac, f"127.0.0.{i + 1}"))
    from_vm(dp, arp(VM2_MAC, HOST_IP), PORT2)
    with caplog.at_level("WARNING", logger="macnat"):
        security.drain(state, now_ns=0)
        security.drain(state, now_ns=3 * 10**8)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"refused: VM 52:54:00:bb:00:00 claims 127.0.0.1, no address a VM may have (on tap{VM_PORT})")
    assert f"refused: VM {VM2_MAC} claims {HOST_IP}, an address of this host (wlan0) (on tap{PORT2})" in lines
    assert f"tap{VM_PORT} sent more events than its rate allows: 30 not reported" in lines
    assert any(line.startswith("... and 19 more like it in the last 0.2 s: refused: VM 52:54:00:bb:00:00")
               for line in lines)
    assert len(lines) == 4, lines


def test_lan_addresses_and_dhcp_requests_age_but_pinned_ones_stay(lan):
    lan.run("wifi_ingress", bytes(arp(LAN_MAC, LAN_IP, pdst=HOST_IP)))
    from_vm(lan, dhcp_request(VM_MAC, 0x6666))
    later = monotonic_ns() + (constants.DHCP_REQUEST_TTL_S + 1) * 10**9
    age_lan_addresses(lan.maps, later, age_ns=10**9)
    age_dhcp_requests(lan.maps, later)
    assert {ip_str(k) for k in lan.maps.lan_addrs.keys()} == {GATEWAY_IP}
    assert list(lan.maps.dhcp_requests.keys()) == []
