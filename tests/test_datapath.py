"""Packet-level tests of each datapath path with BPF_PROG_TEST_RUN (in macnat.harness's namespace):
return code, exact output bytes, checksums (verified by scapy), counters, the redirect target (each
redirect target has its own counter) and what bpf_clone_redirect really transmitted."""

from __future__ import annotations

import ctypes
import select
import socket

import pytest
from scapy.all import ARP, BOOTP, DHCP, ICMP, IP, UDP, Ether, Raw
from scapy.layers.eap import EAPOL
from scapy.layers.ppp import PPP, PPPoE, PPPoED
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_Redirect,
                                ICMPv6ND_RS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptMTU, ICMPv6NDOptPrefixInfo,
                                ICMPv6NDOptSrcLLAddr, IPv6)

from macnat import constants, maps, netns
from macnat.harness import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VM_PORT, Harness
from macnat.maps import MacAddr, ip_key, mac_bytes

WIFI_MAC, VM_MAC, VM2_MAC, LAN_MAC = "02:4d:4e:00:00:0a", "52:54:00:00:01:01", "52:54:00:00:01:02", "02:4d:4e:00:00:14"
HOST_IP, VM_IP, VM2_IP, LAN_IP = "192.168.77.10", "192.168.77.101", "192.168.77.102", "192.168.77.20"
HOST_IP6, VM_IP6, VM_LL6, LAN_IP6 = "fd77:77::10", "fd77:77::5054:ff:fe00:101", "fe80::5054:ff:fe00:101", "fd77:77::20"
BROADCAST = "ff:ff:ff:ff:ff:ff"
TAP_IFINDEX_OF_VM = VM_PORT  # neither 0 nor wifi's ifindex: a frame that entered the bridge from a port


class Datapath(Harness):
    """The harness, answering (return code, output frame, counters that moved) as these tests check."""

    def run(self, program: str, frame: bytes, ingress_ifindex: int = 0):
        result = super().run(program, frame, ingress_ifindex)
        return result.retval, result.data, result.moved


class Sniffer:
    """An AF_PACKET socket on one interface: what really arrived there."""

    def __init__(self, ifname: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.drain()

    def drain(self, timeout: float = 0.0) -> list[bytes]:
        frames = []
        while select.select([self.sock], [], [], timeout)[0]:
            frames.append(self.sock.recv(65536))
        return frames

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def dp():
    harness = Datapath(f"{netns.PREFIX}test-dp", WIFI_MAC)
    yield harness
    harness.close()


@pytest.fixture
def datapath(dp):
    dp.reset(host_addresses=(HOST_IP, HOST_IP6))
    return dp


def test_map_mirrors_match_the_compiled_c_layout(dp):
    """maps.py's ctypes records are the layout bcc compiled from bpf/macnat.h, field by field."""
    for name, (key_type, value_type) in maps.LAYOUT.items():
        table = dp.bpf[name.encode()]
        leaf = table.Leaf._type_ if name == "counters" else table.Leaf  # bcc shows per-CPU values as an array
        for mirror, compiled in ((key_type, table.Key), (value_type, leaf)):
            assert ctypes.sizeof(mirror) == ctypes.sizeof(compiled), name
            if issubclass(compiled, ctypes.Structure):
                ours = [(f, getattr(mirror, f).offset, getattr(mirror, f).size) for f, _ in mirror._fields_]
                theirs = [(f, getattr(compiled, f).offset, getattr(compiled, f).size) for f, _ in compiled._fields_
                          if not f.startswith("__pad")]
                assert ours == theirs, name


def test_vm_hint_slot_mirror_matches_the_datapath(datapath):
    """maps.vm_hint_slot() finds the slot the datapath sets when it learns a MAC."""
    for mac in ("52:54:00:00:01:01", "bc:24:11:9a:fe:07", "02:00:00:ff:ff:ff"):
        datapath.reset()
        datapath.run("uplink_egress", bytes(Ether(src=mac, dst=LAN_MAC) / ARP(op=2, hwsrc=mac, psrc=VM_IP)),
                       TAP_IFINDEX_OF_VM)
        assert [slot.value for slot, hint in datapath.maps.vm_hints.items() if hint.value] == \
            [maps.vm_hint_slot(mac_bytes(mac))]


# ---- VM -> Wi-Fi (uplink_egress) --------------------------------------------------------------

def test_vm_arp_request_is_translated_learned_and_heard_by_the_host(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP, pdst=LAN_IP))
    host_side = Sniffer("wifi0")
    try:
        rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
        heard = [f for f in host_side.drain(0.3) if f[:len(frame)] == frame]
    finally:
        host_side.close()
    assert rc == TC_ACT_REDIRECT
    assert moved == {"vm_to_wifi": 1, "learned_mac": 1, "learned_ip": 1}
    pkt = Ether(out)
    assert pkt.src == WIFI_MAC and pkt.dst == BROADCAST
    assert (pkt[ARP].hwsrc, pkt[ARP].psrc, pkt[ARP].pdst, pkt[ARP].hwdst) == (WIFI_MAC, VM_IP, LAN_IP, "00:00:00:00:00:00")
    assert out[12:] != frame[12:] and out[:6] == frame[:6]
    assert maps.mac_str(datapath.binding(VM_IP).mac) == VM_MAC
    assert len(heard) == 1, "the host got the VM's own (untranslated) broadcast through wifi's ingress"


def test_vm_arp_reply_translates_sender_not_target(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / ARP(op=2, hwsrc=VM_MAC, psrc=VM_IP, hwdst=LAN_MAC, pdst=LAN_IP))
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["vm_to_wifi"] == 1
    pkt = Ether(out)
    assert (pkt.src, pkt.dst, pkt[ARP].hwsrc, pkt[ARP].hwdst) == (WIFI_MAC, LAN_MAC, WIFI_MAC, LAN_MAC)


def test_vm_ipv4_unicast_changes_only_the_source_mac(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / ICMP() / Raw(b"x" * 32))
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT
    assert out == frame[:6] + bytes(mac_bytes(WIFI_MAC)) + frame[12:]
    assert moved == {"vm_to_wifi": 1, "learned_mac": 1, "learned_ip": 1}
    b = datapath.binding(VM_IP)
    assert (b.tx_packets, b.tx_bytes) == (1, len(frame))


def dhcp_discover(flags: int, chksum: int | None = None) -> bytes:
    udp = UDP(sport=68, dport=67) if chksum is None else UDP(sport=68, dport=67, chksum=chksum)
    return bytes(Ether(src=VM_MAC, dst=BROADCAST) / IP(src="0.0.0.0", dst="255.255.255.255") / udp
                 / BOOTP(op=1, chaddr=mac_bytes(VM_MAC), xid=0x1234, flags=flags)
                 / DHCP(options=[("message-type", "discover"), "end"]))


def test_dhcp_request_gets_the_broadcast_flag_with_a_correct_checksum(datapath):
    rc, out, moved = datapath.run("uplink_egress", dhcp_discover(flags=0), TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["dhcp_flag_set"] == 1
    pkt = Ether(out)
    assert pkt[BOOTP].flags == 0x8000 and pkt.src == WIFI_MAC
    assert bytes(pkt[BOOTP].chaddr)[:6] == bytes(mac_bytes(VM_MAC)), "chaddr (the client's identity) is kept"
    sent = pkt[UDP].chksum
    del pkt[UDP].chksum
    assert sent == Ether(bytes(pkt))[UDP].chksum != 0
    assert "learned_ip" not in moved  # 0.0.0.0 is nobody's address


def test_dhcp_without_udp_checksum_keeps_it_zero(datapath):
    rc, out, moved = datapath.run("uplink_egress", dhcp_discover(flags=0, chksum=0), TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["dhcp_flag_set"] == 1
    assert Ether(out)[BOOTP].flags == 0x8000 and Ether(out)[UDP].chksum == 0


def test_dhcp_with_broadcast_flag_already_set_is_left_alone(datapath):
    frame = dhcp_discover(flags=0x8000)
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and "dhcp_flag_set" not in moved
    assert out[12:] == frame[12:]


def test_vm_frame_for_the_host_goes_to_the_host_untranslated(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=WIFI_MAC) / IP(src=VM_IP, dst=HOST_IP) / ICMP())
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["vm_to_host"] == 1 and "vm_to_wifi" not in moved
    assert out == frame


@pytest.mark.parametrize("ingress_ifindex", ["wifi", "host"])
def test_frames_macnat_put_into_the_bridge_are_not_sent_back(datapath, ingress_ifindex):
    iif = datapath.ifindex["wifi0"] if ingress_ifindex == "wifi" else 0
    frame = bytes(Ether(src=LAN_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=LAN_MAC, psrc=LAN_IP, pdst=VM_IP))
    rc, _, moved = datapath.run("uplink_egress", frame, iif)
    assert rc == TC_ACT_SHOT and moved == {"drop_echo": 1}
    assert datapath.maps.vm_macs.lookup(MacAddr(mac_bytes(LAN_MAC))) is None


def test_flooded_frame_between_vms_is_dropped_at_the_uplink(datapath):
    datapath.bind(VM2_IP, VM2_MAC)
    frame = bytes(Ether(src=VM_MAC, dst=VM2_MAC) / IP(src=VM_IP, dst=VM2_IP) / ICMP())
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved == {"drop_vm_to_vm": 1}


def test_vm_claiming_a_host_address_is_refused(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=VM_MAC, psrc=HOST_IP, pdst=HOST_IP))
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved["refused_host_ip"] == 1
    assert datapath.binding(HOST_IP) is None
    refusal = datapath.maps.refusals.lookup(ip_key(HOST_IP))
    assert maps.mac_str(refusal.mac) == VM_MAC and refusal.count == 1


def test_static_binding_is_not_taken_over(datapath):
    datapath.bind(VM_IP, VM2_MAC, flags=constants.BINDING_STATIC)
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / ICMP())
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved["refused_static"] == 1
    assert maps.mac_str(datapath.binding(VM_IP).mac) == VM2_MAC


def test_another_vms_address_is_not_taken_by_an_ordinary_frame(datapath):
    """A binding never moves on an ordinary frame: the claim is refused and recorded for the manager,
    which probes the owner (tests/test_security.py has the rest of this rule)."""
    datapath.bind(VM_IP, VM2_MAC, port=TAP_IFINDEX_OF_VM + 1)
    frame = bytes(Ether(src=VM_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP, pdst=VM_IP))
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved == {"refused_claim": 1}
    assert maps.mac_str(datapath.binding(VM_IP).mac) == VM2_MAC
    claim = datapath.maps.refusals.lookup(ip_key(VM_IP))
    assert (maps.mac_str(claim.mac), maps.mac_str(claim.owner), claim.port) == (VM_MAC, VM2_MAC, TAP_IFINDEX_OF_VM)


@pytest.mark.parametrize("frame", [
    bytes(Ether(src=VM_MAC, dst=BROADCAST, type=0x0806) / Raw(b"\x00\x01\x08\x00")),              # ARP cut short
    bytes(Ether(src=VM_MAC, dst=BROADCAST) / ARP(hwlen=8, plen=4, hwsrc=VM_MAC, psrc=VM_IP))[:60],  # not Ethernet/IPv4 ARP
    bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP, ihl=3) / ICMP()),            # IHL < 5
    bytes.fromhex("ffffffffffff" "010000000001" "0800") + bytes(46),                              # group source MAC
    bytes(14),                                                                                    # zero source MAC
], ids=["arp-truncated", "arp-hlen-8", "ipv4-ihl-3", "group-source", "zero-source"])
# (BPF_PROG_TEST_RUN itself refuses an IPv4 frame shorter than an IP header; test_attach sends one from a VM.)
def test_malformed_vm_frames_are_dropped_and_counted(datapath, frame):
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved.get("drop_malformed") == 1
    assert "vm_to_wifi" not in moved


def test_runt_frames_are_handled_by_every_program(datapath):
    for program in constants.PROGRAMS:
        rc, _, _ = datapath.run(program, bytes(14), TAP_IFINDEX_OF_VM)
        assert rc in (TC_ACT_OK, TC_ACT_SHOT)


# ---- Wi-Fi -> VM (wifi_ingress) ---------------------------------------------------------------

def test_unicast_from_wifi_to_a_vm_address_reaches_that_vm(datapath):
    datapath.bind(VM_IP, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IP(src=LAN_IP, dst=VM_IP) / UDP(sport=9, dport=9) / Raw(b"hi"))
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_REDIRECT and moved == {"wifi_to_vm": 1}
    assert out == bytes(mac_bytes(VM_MAC)) + frame[6:]
    b = datapath.binding(VM_IP)
    assert (b.rx_packets, b.rx_bytes) == (1, len(frame))


def test_arp_reply_for_a_vm_gets_its_mac_back(datapath):
    datapath.bind(VM_IP, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / ARP(op=2, hwsrc=LAN_MAC, psrc=LAN_IP, hwdst=WIFI_MAC, pdst=VM_IP))
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_REDIRECT and moved == {"wifi_to_vm": 1, "learned_lan_mac": 1}
    pkt = Ether(out)
    assert (pkt.dst, pkt[ARP].hwdst, pkt[ARP].hwsrc) == (VM_MAC, VM_MAC, LAN_MAC)
    assert datapath.maps.lan_macs.lookup(MacAddr(mac_bytes(LAN_MAC))) is not None
    assert datapath.run("wifi_ingress", frame)[2] == {"wifi_to_vm": 1}, "a LAN MAC is counted once, when new"


def test_broadcast_from_wifi_reaches_the_vms_and_the_host(datapath):
    datapath.bind(VM_IP, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=LAN_MAC, psrc=LAN_IP, pdst=VM_IP))
    vm_side = Sniffer("vmA")
    try:
        rc, out, moved = datapath.run("wifi_ingress", frame)
        at_vm = [f for f in vm_side.drain(0.3) if f[:len(frame)] == frame]
    finally:
        vm_side.close()
    assert rc == TC_ACT_OK and out == frame and moved == {"group_to_vms": 1, "learned_lan_mac": 1}
    assert len(at_vm) == 1
    assert datapath.maps.lan_macs.lookup(MacAddr(mac_bytes(LAN_MAC))) is not None, "the asker's MAC is noted for the FDB"


def test_host_traffic_from_wifi_is_untouched(datapath):
    datapath.bind(VM_IP, VM_MAC)
    for frame, noted in ((bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IP(src=LAN_IP, dst=HOST_IP) / ICMP()), {}),
                         (bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / ARP(op=1, hwsrc=LAN_MAC, psrc=LAN_IP, pdst=HOST_IP)),
                          {"learned_lan_mac": 1})):   # a LAN host's ARP notes its MAC
        rc, out, moved = datapath.run("wifi_ingress", frame)
        assert rc == TC_ACT_OK and out == frame and moved == {"wifi_to_host": 1, **noted}


@pytest.mark.parametrize("frame, group", [
    (Ether(src=LAN_MAC, dst=WIFI_MAC) / ARP(op=1, hwsrc=LAN_MAC, psrc=LAN_IP, pdst="192.168.77.150"), BROADCAST),
    (Ether(src=LAN_MAC, dst=WIFI_MAC) / IP(src=LAN_IP, dst="255.255.255.255") / UDP(sport=67, dport=68), BROADCAST),
    (Ether(src=LAN_MAC, dst=WIFI_MAC) / IP(src=LAN_IP, dst="224.0.0.251") / UDP(sport=5353, dport=5353), "01:00:5e:00:00:fb"),
    (Ether(src=LAN_MAC, dst=WIFI_MAC) / IP(src=LAN_IP, dst="239.255.128.250") / UDP(sport=1900, dport=1900), "01:00:5e:7f:80:fa"),
], ids=["arp-request", "limited-broadcast", "mdns", "high-bit-group"])
def test_group_frames_an_ap_sent_as_unicast_are_restored(datapath, frame, group):
    frame = bytes(frame)
    rc, out, moved = datapath.run("wifi_ingress", frame)
    noted = {"learned_lan_mac": 1} if ARP in Ether(frame) else {}   # a LAN host's ARP notes its MAC
    assert rc == TC_ACT_OK and moved == {"group_restored": 1, "group_to_vms": 1, **noted}
    assert out == bytes(mac_bytes(group)) + frame[6:]


def test_vm_group_frame_handed_to_the_host_is_not_copied_back_to_the_vms(datapath):
    datapath.bind(VM_IP, VM_MAC)
    frame = bytes(Ether(src=VM_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=VM_MAC, psrc=VM_IP, pdst=HOST_IP))
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_OK and out == frame and moved == {}


def dhcp_reply(message_type: str, chaddr: str, yiaddr: str = VM_IP, leading_options=()) -> bytes:
    return bytes(Ether(src=LAN_MAC, dst=BROADCAST) / IP(src=LAN_IP, dst="255.255.255.255") / UDP(sport=67, dport=68)
                 / BOOTP(op=2, yiaddr=yiaddr, chaddr=mac_bytes(chaddr), xid=0x1234, flags=0x8000)
                 / DHCP(options=[*leading_options, ("message-type", message_type), ("server_id", LAN_IP), "end"]))


@pytest.mark.parametrize("leading_options", [(), ("pad", "pad", ("subnet_mask", "255.255.255.0"), ("router", LAN_IP))],
                         ids=["type-first", "type-after-others"])
def test_dhcp_ack_for_a_vm_binds_its_address_at_once(datapath, leading_options):
    datapath.run("uplink_egress", dhcp_discover(flags=0), TAP_IFINDEX_OF_VM)  # the VM's own request (xid 0x1234)
    frame = dhcp_reply("ack", VM_MAC, leading_options=leading_options)
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_OK and out == frame and moved == {"learned_ip": 1, "group_to_vms": 1}
    b = datapath.binding(VM_IP)
    assert maps.mac_str(b.mac) == VM_MAC and b.tx_packets == 0 and b.port == TAP_IFINDEX_OF_VM


@pytest.mark.parametrize("message_type, chaddr, counted", [("offer", VM_MAC, {}),
                                                           ("ack", VM2_MAC, {"dhcp_ack_unmatched": 1})],
                         ids=["offer", "not-the-requester"])
def test_dhcp_replies_that_do_not_bind(datapath, message_type, chaddr, counted):
    datapath.run("uplink_egress", dhcp_discover(flags=0), TAP_IFINDEX_OF_VM)
    rc, _, moved = datapath.run("wifi_ingress", dhcp_reply(message_type, chaddr))
    assert rc == TC_ACT_OK and moved == {"group_to_vms": 1, **counted}
    assert datapath.binding(VM_IP) is None


def test_dhcp_ack_handing_a_vm_the_hosts_address_is_refused(datapath):
    datapath.run("uplink_egress", dhcp_discover(flags=0), TAP_IFINDEX_OF_VM)
    rc, _, moved = datapath.run("wifi_ingress", dhcp_reply("ack", VM_MAC, yiaddr=HOST_IP))
    assert rc == TC_ACT_OK and moved == {"refused_host_ip": 1, "group_to_vms": 1}
    assert datapath.binding(HOST_IP) is None


# ---- host -> VM (wifi_egress) -----------------------------------------------------------------

def test_host_unicast_to_a_vm_goes_into_the_bridge(datapath):
    datapath.bind(VM_IP, VM_MAC)
    frame = bytes(Ether(src=WIFI_MAC, dst=VM_MAC) / IP(src=HOST_IP, dst=VM_IP) / ICMP())
    rc, out, moved = datapath.run("wifi_egress", frame)
    assert rc == TC_ACT_REDIRECT and out == frame and moved == {"host_to_vm": 1}


def test_host_broadcast_is_copied_to_the_vms_but_translated_vm_broadcast_is_not(datapath):
    frame = bytes(Ether(src=WIFI_MAC, dst=BROADCAST) / ARP(op=1, hwsrc=WIFI_MAC, psrc=HOST_IP, pdst=VM_IP))
    rc, out, moved = datapath.run("wifi_egress", frame, ingress_ifindex=0)
    assert rc == TC_ACT_OK and out == frame and moved == {"group_to_vms": 1}
    rc, out, moved = datapath.run("wifi_egress", frame, ingress_ifindex=TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_OK and moved == {}


def test_host_traffic_to_the_lan_is_untouched(datapath):
    frame = bytes(Ether(src=WIFI_MAC, dst=LAN_MAC) / IP(src=HOST_IP, dst=LAN_IP) / ICMP())
    rc, out, moved = datapath.run("wifi_egress", frame)
    assert rc == TC_ACT_OK and out == frame and moved == {}



def test_a_translated_vm_frame_is_marked_and_wlan0_egress_passes_it_at_once(datapath):
    """uplink_egress marks what it redirects to wlan0 (one bit, the rest of the mark kept); wlan0's egress
    program, which the redirect runs next, passes a marked frame untouched and does not redirect it into
    the bridge even when it is addressed to a VM's MAC (a host frame like it would be)."""
    other_bits = 0x0000ca6c
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IP(src=VM_IP, dst=LAN_IP) / ICMP())
    translated = Harness.run(datapath, "uplink_egress", frame, TAP_IFINDEX_OF_VM, mark=other_bits)
    assert translated.retval == TC_ACT_REDIRECT and translated.mark == other_bits | constants.MARK_FROM_VMS
    passed = Harness.run(datapath, "wifi_egress", translated.data, mark=translated.mark)
    assert (passed.retval, passed.data, passed.moved, passed.mark) == (TC_ACT_OK, translated.data, {}, translated.mark)
    datapath.bind(VM_IP, VM_MAC)
    to_a_vm = bytes(Ether(src=WIFI_MAC, dst=VM_MAC) / IP(src=LAN_IP, dst=VM_IP) / ICMP())
    assert Harness.run(datapath, "wifi_egress", to_a_vm, mark=constants.MARK_FROM_VMS).retval == TC_ACT_OK
    host_frame = Harness.run(datapath, "wifi_egress", to_a_vm, mark=other_bits)
    assert (host_frame.retval, host_frame.mark) == (TC_ACT_REDIRECT, other_bits)

# ---- IPv6 ----------------------------------------------------------------------------------------

def ll_options(pkt) -> list[str]:
    """The MACs in the NDP link-layer address options of a parsed frame, in order."""
    found, layer = [], pkt
    while layer:
        if isinstance(layer, (ICMPv6NDOptSrcLLAddr, ICMPv6NDOptDstLLAddr)):
            found.append(layer.lladdr)
        layer = layer.payload if layer.payload else None
    return found


def icmpv6_checksum_ok(frame: bytes) -> bool:
    pkt = Ether(frame)
    icmp = pkt[IPv6].payload
    sent = icmp.cksum
    del icmp.cksum
    return Ether(bytes(pkt))[IPv6].payload.cksum == sent


NDP_FROM_VM = {
    "ns": Ether(src=VM_MAC, dst="33:33:ff:00:00:20") / IPv6(src=VM_LL6, dst="ff02::1:ff00:20", hlim=255)
          / ICMPv6ND_NS(tgt=LAN_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC),
    "na": Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=VM_IP6, dst=LAN_IP6, hlim=255)
          / ICMPv6ND_NA(tgt=VM_IP6, R=0, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=VM_MAC),
    "rs": Ether(src=VM_MAC, dst="33:33:00:00:00:02") / IPv6(src=VM_LL6, dst="ff02::2", hlim=255)
          / ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC),
    "ra-options-first": Ether(src=VM_MAC, dst="33:33:00:00:00:01") / IPv6(src=VM_LL6, dst="ff02::1", hlim=255)
          / ICMPv6ND_RA() / ICMPv6NDOptMTU(mtu=1500) / ICMPv6NDOptPrefixInfo(prefix="fd77:78::", prefixlen=64)
          / ICMPv6NDOptSrcLLAddr(lladdr=VM_MAC),
    "redirect-to-another-vm": Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=VM_LL6, dst=LAN_IP6, hlim=255)
          / ICMPv6ND_Redirect(tgt="fe80::5054:ff:fe00:102", dst="fd77:78::1") / ICMPv6NDOptDstLLAddr(lladdr=VM2_MAC),
}


@pytest.mark.parametrize("name", NDP_FROM_VM)
def test_ndp_link_layer_options_of_a_vm_carry_the_wifi_mac(datapath, name):
    datapath.maps.add_vm_mac(mac_bytes(VM2_MAC), last_seen_ns=1, port=TAP_IFINDEX_OF_VM + 1)
    frame = bytes(NDP_FROM_VM[name])
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["vm_to_wifi"] == 1 and moved["ndp_rewritten"] == 1
    pkt = Ether(out)
    assert pkt.src == WIFI_MAC and ll_options(pkt) == [WIFI_MAC]
    assert icmpv6_checksum_ok(out)
    assert len(out) == len(frame)


def test_ndp_option_with_a_lan_mac_is_left_alone(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=VM_IP6, dst=LAN_IP6, hlim=255)
                  / ICMPv6ND_NA(tgt="fd77:77::99") / ICMPv6NDOptDstLLAddr(lladdr="02:00:00:00:00:99"))
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and "ndp_rewritten" not in moved
    assert out[12:] == frame[12:]


def test_ndp_option_of_length_zero_is_dropped(datapath):
    frame = bytes(Ether(src=VM_MAC, dst="33:33:00:00:00:02") / IPv6(src=VM_LL6, dst="ff02::2", hlim=255)
                  / ICMPv6ND_RS() / Raw(bytes([1, 0]) + bytes(bytes(mac_bytes(VM_MAC)))))
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved.get("drop_malformed") == 1 and "vm_to_wifi" not in moved


def test_vm_ipv6_source_is_learned(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=VM_IP6, dst=LAN_IP6) / ICMPv6EchoRequest())
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["learned_ip"] == 1
    assert out == frame[:6] + bytes(mac_bytes(WIFI_MAC)) + frame[12:]
    assert maps.mac_str(datapath.binding(VM_IP6).mac) == VM_MAC
    assert maps.ip_family(ip_key(VM_IP6)) == "ipv6" and maps.ip_str(ip_key(VM_IP6)) == VM_IP6


def dad_probe(src_mac: str, target: str) -> bytes:
    return bytes(Ether(src=src_mac, dst="33:33:ff:00:01:01") / IPv6(src="::", dst="ff02::1:ff00:101", hlim=255)
                 / ICMPv6ND_NS(tgt=target))


def test_vm_dad_probe_binds_the_tentative_address(datapath):
    rc, _, moved = datapath.run("uplink_egress", dad_probe(VM_MAC, VM_IP6), TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["learned_ip"] == 1
    assert maps.mac_str(datapath.binding(VM_IP6).mac) == VM_MAC


def test_vm_dad_probe_for_the_hosts_address_is_refused_but_goes_on(datapath):
    rc, _, moved = datapath.run("uplink_egress", dad_probe(VM_MAC, HOST_IP6), TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["refused_host_ip"] == 1
    assert datapath.binding(HOST_IP6) is None


def test_vm_claiming_the_hosts_ipv6_address_is_refused(datapath):
    frame = bytes(Ether(src=VM_MAC, dst=LAN_MAC) / IPv6(src=HOST_IP6, dst=LAN_IP6) / ICMPv6EchoRequest())
    rc, _, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved["refused_host_ip"] == 1


def test_ipv6_unicast_from_wifi_reaches_the_vm(datapath):
    datapath.bind(VM_IP6, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IPv6(src=LAN_IP6, dst=VM_IP6) / ICMPv6EchoRequest())
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_REDIRECT and moved == {"wifi_to_vm": 1}
    assert out == bytes(mac_bytes(VM_MAC)) + frame[6:]


def test_unicast_neighbour_solicitation_for_a_vm_reaches_it(datapath):
    datapath.bind(VM_IP6, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IPv6(src=LAN_IP6, dst=VM_IP6, hlim=255)
                  / ICMPv6ND_NS(tgt=VM_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=LAN_MAC))
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_REDIRECT and moved == {"wifi_to_vm": 1, "learned_lan_mac": 1}
    assert out == bytes(mac_bytes(VM_MAC)) + frame[6:]
    assert datapath.maps.lan_macs.lookup(MacAddr(mac_bytes(LAN_MAC))) is not None


def test_ipv6_for_the_host_is_untouched(datapath):
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IPv6(src=LAN_IP6, dst=HOST_IP6) / ICMPv6EchoRequest())
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_OK and out == frame and moved == {"wifi_to_host": 1}


@pytest.mark.parametrize("group_ip, group_mac", [("ff02::1", "33:33:00:00:00:01"),
                                                 ("ff02::1:ff00:101", "33:33:ff:00:01:01"),
                                                 ("ff05::1:3", "33:33:00:01:00:03")],
                         ids=["all-nodes", "solicited-node", "dhcpv6-servers"])
def test_ipv6_multicast_an_ap_sent_as_unicast_is_restored(datapath, group_ip, group_mac):
    frame = bytes(Ether(src=LAN_MAC, dst=WIFI_MAC) / IPv6(src=LAN_IP6, dst=group_ip) / UDP(sport=547, dport=546))
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_OK and moved == {"group_restored": 1, "group_to_vms": 1}
    assert out == bytes(mac_bytes(group_mac)) + frame[6:]


def test_lan_dad_probe_for_a_vm_address_drops_the_binding(datapath):
    datapath.bind(VM_IP6, VM_MAC)
    vm_side = Sniffer("vmA")
    try:
        rc, _, moved = datapath.run("wifi_ingress", dad_probe(LAN_MAC, VM_IP6))
        delivered = [f for f in vm_side.drain(0.3) if f.startswith(bytes(mac_bytes("33:33:ff:00:01:01")))]
    finally:
        vm_side.close()
    assert rc == TC_ACT_OK and moved == {"dad_conflict": 1, "group_to_vms": 1}
    assert datapath.binding(VM_IP6) is None
    assert delivered, "the VM still gets the probe, so it can defend its address"


def test_lan_dad_probe_leaves_a_static_binding(datapath):
    datapath.bind(VM_IP6, VM_MAC, flags=constants.BINDING_STATIC)
    rc, _, moved = datapath.run("wifi_ingress", dad_probe(LAN_MAC, VM_IP6))
    assert rc == TC_ACT_OK and "dad_conflict" not in moved
    assert datapath.binding(VM_IP6) is not None


def test_lan_solicitation_for_a_vm_notes_the_lan_mac(datapath):
    datapath.bind(VM_IP6, VM_MAC)
    frame = bytes(Ether(src=LAN_MAC, dst="33:33:ff:00:01:01") / IPv6(src=LAN_IP6, dst="ff02::1:ff00:101", hlim=255)
                  / ICMPv6ND_NS(tgt=VM_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=LAN_MAC))
    rc, _, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_OK and moved == {"group_to_vms": 1, "learned_lan_mac": 1}
    assert datapath.maps.lan_macs.lookup(MacAddr(mac_bytes(LAN_MAC))) is not None


# ---- other EtherTypes (VM -> Wi-Fi), PPPoE both ways ------------------------------------------

AP_MAC, PPPOE_SERVER_MAC = "02:4d:4e:00:00:01", "02:4d:4e:00:00:30"
PPPOE_PADI, PPPOE_PADO, PPPOE_PADT = 0x09, 0x07, 0xA7


@pytest.mark.parametrize("frame, counter", [
    (Ether(src=VM_MAC, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(bytes(40)), "drop_link_local"),   # LLDP
    (Ether(src=VM_MAC, dst=BROADCAST, type=0x88CC) / Raw(bytes(40)), "drop_link_local"),             # LLDP, any dst
    (Ether(src=VM_MAC, dst="01:80:c2:00:00:02", type=0x8809) / Raw(bytes(40)), "drop_link_local"),   # LACP
    (Ether(src=VM_MAC, dst="01:80:c2:00:00:03") / EAPOL(version=2, type=1), "drop_link_local"),      # EAPOL-Start
    (Ether(src=VM_MAC, dst=AP_MAC) / EAPOL(version=2, type=3), "drop_station_control"),              # EAPOL-Key
    (Ether(src=VM_MAC, dst=AP_MAC, type=0x88C7) / Raw(bytes(40)), "drop_station_control"),           # RSN pre-auth
    (Ether(src=VM_MAC, dst=AP_MAC, type=0x890D) / Raw(bytes(40)), "drop_station_control"),           # TDLS, FT
    (Ether(src=VM_MAC, dst=BROADCAST, type=0x8137) / Raw(bytes(40)), "drop_ethertype"),              # IPX
    (Ether(src=VM_MAC, dst=BROADCAST, type=0x809B) / Raw(bytes(40)), "drop_ethertype"),              # AppleTalk
    (Ether(src=VM_MAC, dst=BROADCAST, type=0x88A2) / Raw(bytes(40)), "drop_ethertype"),              # AoE
], ids=["lldp", "lldp-broadcast", "lacp", "eapol-start", "eapol-key", "preauth", "tdls", "ipx", "appletalk", "aoe"])
def test_vm_frames_that_cannot_be_the_stations_are_dropped_and_counted(datapath, frame, counter):
    """A VM's LLDP, LACP or EAPOL-Start describes or claims its own link, which ends at the bridge; an
    EAPOL-Key, pre-authentication or TDLS frame sent as the station's would be taken by the AP for the
    station's own handshake; IPX, AppleTalk and AoE answers would come to the station's MAC with nothing
    to tell which VM they are for. Each is dropped before anything is learned from it."""
    rc, _, moved = datapath.run("uplink_egress", bytes(frame), TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_SHOT and moved == {counter: 1}
    assert datapath.maps.vm_macs.lookup(MacAddr(mac_bytes(VM_MAC))) is None


def test_wake_on_lan_from_a_vm_leaves_as_the_stations(datapath):
    """A magic packet is one-way and names its target inside: it goes out with the Wi-Fi MAC as source."""
    frame = bytes(Ether(src=VM_MAC, dst=BROADCAST, type=0x0842) / Raw(b"\xff" * 6 + bytes(mac_bytes(LAN_MAC)) * 16))
    rc, out, moved = datapath.run("uplink_egress", frame, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved == {"vm_to_wifi": 1, "learned_mac": 1}
    assert out == frame[:6] + bytes(mac_bytes(WIFI_MAC)) + frame[12:]


def pppoe_discovery(src: str, dst: str, code: int, session: int = 0) -> bytes:
    return bytes(Ether(src=src, dst=dst) / PPPoED(code=code, sessionid=session))


def test_pppoe_is_one_vms_at_a_time_both_ways(datapath):
    """A PPPoE server answers the station's MAC with nothing in the frame that names a VM: the first VM
    to send PPPoE has it (its PADI leaves as the station's, the PADO and session frames come back to its
    MAC), another VM's PPPoE is refused, and a PADT from the server ends the first VM's turn."""
    padi = pppoe_discovery(VM_MAC, BROADCAST, PPPOE_PADI)
    rc, out, moved = datapath.run("uplink_egress", padi, TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT and moved["vm_to_wifi"] == 1
    assert out == padi[:6] + bytes(mac_bytes(WIFI_MAC)) + padi[12:]
    rc, _, moved = datapath.run("uplink_egress", pppoe_discovery(VM2_MAC, BROADCAST, PPPOE_PADI), TAP_IFINDEX_OF_VM + 1)
    assert rc == TC_ACT_SHOT and moved == {"refused_pppoe": 1}

    for frame in (pppoe_discovery(PPPOE_SERVER_MAC, WIFI_MAC, PPPOE_PADO),
                  bytes(Ether(src=PPPOE_SERVER_MAC, dst=WIFI_MAC) / PPPoE(sessionid=5) / PPP(proto=0xC021) / Raw(b"\x01\x01\x00\x04")),
                  pppoe_discovery(PPPOE_SERVER_MAC, WIFI_MAC, PPPOE_PADT, session=5)):
        rc, out, moved = datapath.run("wifi_ingress", frame)
        assert rc == TC_ACT_REDIRECT and moved == {"wifi_to_vm": 1, "pppoe_to_vm": 1}
        assert out == bytes(mac_bytes(VM_MAC)) + frame[6:]
    # the PADT ended it: the server's next frame is the host's, and the other VM may start
    frame = pppoe_discovery(PPPOE_SERVER_MAC, WIFI_MAC, PPPOE_PADO)
    rc, out, moved = datapath.run("wifi_ingress", frame)
    assert rc == TC_ACT_OK and moved == {"wifi_to_host": 1} and out == frame
    rc, _, moved = datapath.run("uplink_egress", pppoe_discovery(VM2_MAC, BROADCAST, PPPOE_PADI), TAP_IFINDEX_OF_VM + 1)
    assert rc == TC_ACT_REDIRECT and moved["vm_to_wifi"] == 1


def test_a_vms_own_padt_ends_its_pppoe(datapath):
    datapath.run("uplink_egress", pppoe_discovery(VM_MAC, BROADCAST, PPPOE_PADI), TAP_IFINDEX_OF_VM)
    rc, _, _ = datapath.run("uplink_egress", pppoe_discovery(VM_MAC, PPPOE_SERVER_MAC, PPPOE_PADT, 5), TAP_IFINDEX_OF_VM)
    assert rc == TC_ACT_REDIRECT
    rc, _, moved = datapath.run("uplink_egress", pppoe_discovery(VM2_MAC, BROADCAST, PPPOE_PADI), TAP_IFINDEX_OF_VM + 1)
    assert rc == TC_ACT_REDIRECT and "refused_pppoe" not in moved
