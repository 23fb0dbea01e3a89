"""Hostile frames for the datapath, and the invariants every frame must keep (issue #12's proof).

A frame is built with scapy from drawn choices: realistic layers (ARP, IPv4, UDP/DHCP, IPv6 with
extension headers, NDP with option lists, VLAN tags, LLC) whose fields, options and lengths are
fuzzed, then perhaps truncated, padded or flipped. The same builder serves the hypothesis property
test (tests/test_properties.py draws through hypothesis, which shrinks a failing frame) and this
module's own run over many frames (`python -m macnat.fuzz --frames 1000000`, which draws from a
seeded random.Random, for speed). Each frame runs through BPF_PROG_TEST_RUN in macnat.harness's
namespace, from a known state (two VMs, a static binding, the gateway pinned, a DHCP request
pending), and is checked for:

- a return code in {TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT};
- the same length out as in;
- only the bytes macnat may change changed: Ethernet addresses, ARP sha/tha, NDP link-layer option
  payloads and the ICMPv6 checksum, the BOOTP flags and the UDP checksum;
- no VM's MAC left where a receiver on the LAN reads a MAC (Ethernet source, ARP sha/tha, NDP
  link-layer options) in a frame sent out to Wi-Fi;
- an L4 checksum that was valid before still valid after;
- no binding for a non-unicast, host, reserved, off-link or foreign-family address;
- no table changed by a frame that was dropped.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import random
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from scapy.all import ARP, BOOTP, DHCP, ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, Raw
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_Redirect,
                                ICMPv6ND_RS, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.layers.l2 import LLC, SNAP, Dot3

from macnat import bpfsys, constants, netns
from macnat.clock import monotonic_ns
from macnat.frames import internet_checksum
from macnat.harness import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VM_PORT, Harness
from macnat.manager.duties.lan_side import pin_gateway, sync_onlink_prefixes
from macnat.maps import IPV4_MAPPED_PREFIX, DhcpRequest, LanMac, MacAddr, ip_key, mac_bytes, xid_key

T = TypeVar("T")

WIFI_MAC, VM_MAC, VM2_MAC, STATIC_MAC = "02:4d:4e:00:00:0a", "52:54:00:00:01:01", "52:54:00:00:01:02", \
    "52:54:00:00:01:03"
GATEWAY_MAC, LAN_MAC = "02:4d:4e:00:00:01", "02:4d:4e:00:00:14"
HOST_IP, GATEWAY_IP, VM_IP, VM2_IP, STATIC_IP, LAN_IP = "192.168.77.10", "192.168.77.1", "192.168.77.101", \
    "192.168.77.102", "192.168.77.60", "192.168.77.20"
HOST_IP6, VM_IP6, VM_LL6, VM2_IP6, LAN_IP6 = "fd77:77::10", "fd77:77::5054:ff:fe00:101", "fe80::5054:ff:fe00:101", \
    "fd77:77::5054:ff:fe00:102", "fd77:77::20"
PORT2 = VM_PORT + 1
XIDS = {0x1234: (VM_MAC, VM_PORT), 0x5678: (VM2_MAC, PORT2)}  # DHCP requests pending in the known state
ONLINK = (ipaddress.ip_network("192.168.77.0/24"), ipaddress.ip_network("fd77:77::/64"))
VERDICTS = {TC_ACT_OK: "ok", TC_ACT_SHOT: "dropped", TC_ACT_REDIRECT: "redirected", None: "not run"}
TABLES = ("bindings", "vm_macs", "lan_macs", "lan_addrs", "dhcp_requests")  # what a frame may teach

MACS = [VM_MAC, VM2_MAC, STATIC_MAC, GATEWAY_MAC, LAN_MAC, WIFI_MAC, "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
        "33:33:00:00:00:01", "33:33:ff:00:01:01", "01:00:5e:00:00:fb", "52:54:00:aa:bb:cc", "01:80:c2:00:00:00"]
IPV4 = [HOST_IP, GATEWAY_IP, VM_IP, VM2_IP, STATIC_IP, LAN_IP, "0.0.0.0", "255.255.255.255", "127.0.0.1",
        "169.254.1.1", "224.0.0.251", "240.0.0.1", "192.168.77.255", "192.168.77.0", "8.8.8.8", "192.0.2.1",
        "192.168.77.150"]
IPV6 = [HOST_IP6, VM_IP6, VM_LL6, VM2_IP6, LAN_IP6, "::", "::1", f"::ffff:{VM_IP}", f"::ffff:{HOST_IP}",
        "::ffff:224.0.0.1", "::ffff:0.0.0.0", "ff02::1", "ff02::2", "ff02::1:ff00:101", "2001:db8::1", "fe80::1",
        "fd77:77::150", "2a00:1450::1"]
VM_SOURCES = [VM_MAC, VM_MAC, VM_MAC, VM2_MAC, STATIC_MAC, "52:54:00:aa:bb:cc", GATEWAY_MAC, LAN_MAC, WIFI_MAC,
              "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"]
LAN_SOURCES = [GATEWAY_MAC, LAN_MAC, LAN_MAC, "02:4d:4e:00:00:99", VM_MAC, WIFI_MAC]


class Draw(Protocol):
    """Where the choices come from: hypothesis (which shrinks them) or a seeded random.Random."""

    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def raw(self, size: int) -> bytes: ...


class RandomDraw:
    def __init__(self, seed: int):
        self.random = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.random.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.random.randrange(len(options))]

    def raw(self, size: int) -> bytes:
        return self.random.randbytes(size)


def chance(draw: Draw, percent: int) -> bool:
    return draw.integer(0, 99) < percent


def sometimes(draw: Draw, value: int, low: int, high: int, percent: int = 10) -> int:
    """A field's proper value, or now and then any value of its range."""
    return draw.integer(low, high) if chance(draw, percent) else value


@dataclass(frozen=True)
class Case:
    program: str
    port: int           # ingress ifindex (uplink_egress: a VM's bridge port)
    frame: bytes


# ---- frames ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sender:
    """Who a frame claims to come from: its MAC, and the addresses it uses."""

    mac: str
    ipv4: Sequence[str]
    ipv6: Sequence[str]


def arp_layer(draw: Draw, sender: Sender):
    macs = [sender.mac, VM_MAC, VM2_MAC, LAN_MAC, GATEWAY_MAC, WIFI_MAC, "00:00:00:00:00:00", "52:54:00:aa:bb:cc"]
    return ARP(hwtype=sometimes(draw, 1, 0, 0xFFFF), ptype=sometimes(draw, 0x0800, 0, 0xFFFF),
               hwlen=sometimes(draw, 6, 0, 255), plen=sometimes(draw, 4, 0, 255),
               op=draw.choice([1, 1, 2, 2, 0, 3, 4, 8, 25, 65535]), hwsrc=draw.choice([sender.mac, *macs]),
               psrc=draw.choice(sender.ipv4), hwdst=draw.choice(macs), pdst=draw.choice(IPV4))


def dhcp_layers(draw: Draw, sender: Sender, request: bool):
    xid = draw.choice([*XIDS, 0x9999, draw.integer(0, 2**32 - 1)])
    others = [sender.mac, VM_MAC, VM2_MAC, STATIC_MAC, LAN_MAC, "52:54:00:aa:bb:cc"]
    # A reply mostly to a pending request's own client (then it may bind or move an address), else to anyone.
    chaddr = XIDS[xid][0] if xid in XIDS and not request and chance(draw, 70) else draw.choice(others)
    kind = draw.choice(["discover", "request", "ack", "ack", "offer", "nak", "inform"])
    options = [draw.choice(["pad", ("subnet_mask", "255.255.255.0"), ("router", GATEWAY_IP)])
               for _ in range(draw.integer(0, 3))]
    options += [("message-type", kind), ("server_id", GATEWAY_IP), "end"]
    ports = (68, 67) if request else (67, 68)
    return UDP(sport=ports[0], dport=ports[1]) / BOOTP(
        op=sometimes(draw, 1 if request else 2, 0, 255), htype=sometimes(draw, 1, 0, 255),
        hlen=sometimes(draw, 6, 0, 255), xid=xid, flags=draw.choice([0, 0x8000, 0x0001]),
        ciaddr=draw.choice(["0.0.0.0", VM_IP]), yiaddr=draw.choice(IPV4), chaddr=mac_bytes(chaddr)) \
        / DHCP(options=options)


def ipv4_layers(draw: Draw, sender: Sender, vm_side: bool):
    ip = IP(src=draw.choice(sender.ipv4), dst=draw.choice(IPV4), ihl=draw.choice([None] * 9 + [draw.integer(0, 15)]),
            flags=draw.choice([0, 0, 0, 1]), frag=draw.choice([0, 0, 0, 1]))
    upper = draw.choice(["dhcp", "dhcp", "udp", "icmp", "tcp"])
    if upper == "dhcp":
        return ip / dhcp_layers(draw, sender, request=vm_side if chance(draw, 80) else not vm_side)
    if upper == "udp":
        return ip / UDP(sport=draw.integer(1, 65535), dport=draw.choice([53, 67, 68, 5353, 9])) / Raw(draw.raw(8))
    if upper == "tcp":
        return ip / TCP(sport=draw.integer(1, 65535), dport=80)
    return ip / ICMP() / Raw(draw.raw(draw.integer(0, 16)))


def ndp_options(draw: Draw) -> bytes:
    """An option list: link-layer options with MACs of VMs and others, other options, and now and then
    a length of 0, a length past the end or a link-layer option that is no Ethernet address."""
    out = b""
    for _ in range(draw.choice([0, 1, 1, 2, 3, 8, 12, 70])):
        kind = draw.choice([1, 2, 1, 2, 3, 5, 25, 14, 200])
        if kind in (1, 2):
            length = sometimes(draw, 1, 0, 3)
            mac = bytes(mac_bytes(draw.choice([VM_MAC, VM2_MAC, LAN_MAC, WIFI_MAC, "52:54:00:aa:bb:cc"])))
            out += bytes([kind, length]) + (mac + bytes(max(0, length * 8 - 8)))[:max(0, length * 8 - 2)]
        else:
            length = sometimes(draw, draw.choice([1, 4]), 0, 255, percent=5)
            out += bytes([kind, length]) + draw.raw(max(0, min(length * 8, 64) - 2))
    return out


EXTENSIONS = [lambda d: IPv6ExtHdrHopByHop(), lambda d: IPv6ExtHdrDestOpt(),
              lambda d: IPv6ExtHdrRouting(type=0, addresses=[], segleft=0),
              lambda d: IPv6ExtHdrFragment(offset=d.choice([0, 0, 1, 100]), m=d.choice([0, 1]))]


def ipv6_layers(draw: Draw, sender: Sender):
    src, dst = draw.choice(sender.ipv6), draw.choice(IPV6)
    layers = IPv6(src=src, dst=dst, hlim=draw.choice([255, 255, 64]))
    for _ in range(draw.choice([0, 0, 0, 1, 2, 9])):
        layers = layers / draw.choice(EXTENSIONS)(draw)
    target = draw.choice(IPV6)
    message = draw.choice(["ns", "ns", "na", "na", "rs", "ra", "redirect", "echo", "udp"])
    if message == "echo":
        return layers / ICMPv6EchoRequest() / Raw(draw.raw(8))
    if message == "udp":
        return layers / UDP(sport=546, dport=547) / Raw(draw.raw(12))
    ndp = {"ns": lambda: ICMPv6ND_NS(tgt=target), "na": lambda: ICMPv6ND_NA(tgt=target, O=draw.integer(0, 1)),
           "rs": ICMPv6ND_RS, "ra": ICMPv6ND_RA, "redirect": lambda: ICMPv6ND_Redirect(tgt=target, dst=draw.choice(IPV6))}
    return layers / ndp[message]() / Raw(ndp_options(draw))


FRESH4, FRESH6 = ["192.168.77.150", "192.168.77.151", "0.0.0.0"], ["fd77:77::150", "fe80::150", "::"]


def sender(draw: Draw, program: str) -> tuple[Sender, int]:
    """Who sends, and through which port: for uplink_egress half the time a VM being itself (its own
    MAC, on its own port, with its own or new plausible addresses), half the time one lying about
    anything; for wifi_ingress the LAN (the gateway, a LAN host, an impostor); for wifi_egress the host."""
    if program == "uplink_egress":
        if chance(draw, 50):
            mac, port, ipv4, ipv6 = draw.choice([(VM_MAC, VM_PORT, [VM_IP], [VM_IP6, VM_LL6]),
                                                 (VM2_MAC, PORT2, [VM2_IP], [VM2_IP6])])
            return Sender(mac, ipv4 + FRESH4, ipv6 + FRESH6), port
        return Sender(draw.choice(VM_SOURCES), IPV4, IPV6), draw.choice([VM_PORT, VM_PORT, PORT2, 0])
    if program == "wifi_ingress":
        return Sender(draw.choice(LAN_SOURCES), IPV4, IPV6), 0
    return Sender(WIFI_MAC, [HOST_IP], [HOST_IP6]), 0


def base_frame(draw: Draw, program: str) -> Case:
    """A frame for one program, built with scapy from drawn layers and fields."""
    who, port = sender(draw, program)
    dst = draw.choice(MACS) if program == "uplink_egress" or chance(draw, 40) else WIFI_MAC
    layer = draw.choice(["arp", "arp", "ipv4", "ipv4", "ipv6", "ipv6", "ipv6", "vlan", "llc", "other"])
    if layer == "arp":
        pkt = Ether(src=who.mac, dst=dst) / arp_layer(draw, who)
    elif layer == "ipv4":
        ip = ipv4_layers(draw, who, program == "uplink_egress")
        if program == "wifi_ingress" and BOOTP in ip and chance(draw, 70):
            dst = "ff:ff:ff:ff:ff:ff"  # the server's reply to a request with the broadcast flag
        pkt = Ether(src=who.mac, dst=dst) / ip
    elif layer == "ipv6":
        pkt = Ether(src=who.mac, dst=dst) / ipv6_layers(draw, who)
    elif layer == "vlan":
        tag = draw.choice([Dot1Q(vlan=10), Dot1AD(vlan=20) / Dot1Q(vlan=10)])
        pkt = Ether(src=who.mac, dst=dst) / tag / draw.choice([arp_layer(draw, who), ipv6_layers(draw, who)])
    elif layer == "llc":
        pkt = Dot3(src=who.mac, dst=dst) / LLC(dsap=0xAA, ssap=0xAA, ctrl=3) / SNAP(OUI=0, code=0x0806) \
            / arp_layer(draw, who)
    else:
        pkt = Ether(src=who.mac, dst=dst, type=draw.choice([0x88CC, 0x8863, 0x0801, 0xFFFF])) / Raw(draw.raw(46))
    return Case(program, port, bytes(pkt))


def mutate(draw: Draw, case: Case) -> Case:
    """Perhaps truncated, with a trailer, a bit flipped, a length field or an address replaced."""
    frame = bytearray(case.frame)
    mutation = draw.choice(["none"] * 5 + ["truncate", "trailer", "flip", "length", "address"])
    if mutation == "truncate":
        frame = frame[:draw.integer(14, len(frame))]
    elif mutation == "trailer":
        frame += draw.raw(draw.integer(1, 40))
    elif mutation == "flip" and len(frame) > 12:
        at = draw.integer(12, len(frame) - 1)
        frame[at] ^= 1 << draw.integer(0, 7)
    elif mutation == "length":  # the IPv4 total or IPv6 payload length, or an IPv4 datagram's UDP length
        at = draw.choice([16, 18, 38])
        if at + 2 <= len(frame):
            frame[at:at + 2] = struct.pack("!H", draw.integer(0, 0xFFFF))
    elif mutation == "address":  # a MAC in the Ethernet or ARP header, or an IPv4 or IPv6 source
        at, value = draw.choice([(0, "mac"), (6, "mac"), (22, "mac"), (32, "mac"), (26, "ipv4"), (28, "ipv4"),
                                 (22, "ipv6")])
        data = bytes(mac_bytes(draw.choice(MACS))) if value == "mac" else \
            ipaddress.ip_address(draw.choice(IPV4 if value == "ipv4" else IPV6)).packed
        if at + len(data) <= len(frame):
            frame[at:at + len(data)] = data
    return Case(case.program, case.port, bytes(frame))


def hostile_frame(draw: Draw, program: str) -> Case:
    return mutate(draw, base_frame(draw, program))


# ---- the known state, and what may change --------------------------------------------------------

def known_state(h: Harness, onlink: bool = True) -> None:
    """Two VMs with their addresses (vm1 on VM_PORT, vm2 on PORT2), a static binding not yet used, the
    gateway pinned, a LAN host known, the on-link prefixes (if asked), and a DHCP request per VM."""
    h.set_wifi_mac(WIFI_MAC)
    h.reset(host_addresses=(HOST_IP, HOST_IP6), hints=False)
    for ip in (VM_IP, VM_IP6, VM_LL6):
        h.bind(ip, VM_MAC, port=VM_PORT)
    for ip in (VM2_IP, VM2_IP6):
        h.bind(ip, VM2_MAC, port=PORT2)
    h.bind(STATIC_IP, STATIC_MAC, flags=constants.BINDING_STATIC, port=0)
    pin_gateway(h.maps, GATEWAY_IP, GATEWAY_MAC, now_ns=1)
    h.maps.lan_macs.update(MacAddr(mac_bytes(LAN_MAC)), LanMac(last_seen_ns=1))
    if onlink:
        sync_onlink_prefixes(h.maps, set(ONLINK))
    for xid, (mac, port) in XIDS.items():
        now = monotonic_ns()
        h.maps.dhcp_requests.update(xid_key(xid), DhcpRequest(mac=mac_bytes(mac), port=port, message=1, requests=1,
                                                             first_ns=now, time_ns=now))


def snapshot(h: Harness) -> dict:
    tables = {name: {bytes(k): bytes(v) for k, v in h.maps.by_name[name].items()} for name in TABLES}
    # A port's state record may appear for any frame (its event window): only its learned counts matter.
    tables["learned"] = {k.value: list(v.learned.count) for k, v in h.maps.ports.items() if any(v.learned.count)}
    return tables


@dataclass
class Layout:
    """Where the bytes macnat may change are in a frame, and the checksums that cover them, found the
    way a receiver parses the frame (independently of the datapath's C)."""

    mutable: set[int] = field(default_factory=lambda: set(range(12)))
    checksums: list[tuple[bytes, int, int]] = field(default_factory=list)  # (pseudo-header, start, end)
    macs: list[int] = field(default_factory=lambda: [6])  # where a receiver reads a MAC (the sender's, ...)


def layout(frame: bytes) -> Layout:
    out = Layout()
    if len(frame) < 14:
        return out
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0806:
        out.mutable |= set(range(22, 28)) | set(range(32, 38))
        out.macs += [22, 32]
    elif ethertype == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 0xF) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        udp = 14 + ihl
        end = min(len(frame), 14 + total)
        if frame[23] == 17 and ihl >= 20 and udp + 8 <= end:
            udp_end = min(end, udp + struct.unpack("!H", frame[udp + 4:udp + 6])[0])
            out.mutable |= {udp + 6, udp + 7, udp + 8 + 10, udp + 8 + 11}
            if frame[udp + 6:udp + 8] != b"\0\0" and udp_end >= udp + 8:
                pseudo = frame[26:34] + struct.pack("!BBH", 0, 17, udp_end - udp)
                out.checksums.append((pseudo, udp, udp_end))
    elif ethertype == 0x86DD and len(frame) >= 54:
        end = min(len(frame), 54 + struct.unpack("!H", frame[18:20])[0])
        nexthdr, off = frame[20], 54
        for _ in range(16):
            if nexthdr not in (0, 43, 60, 44, 51) or off + 8 > end:
                break
            if nexthdr == 44:
                if struct.unpack("!H", frame[off + 2:off + 4])[0] & 0xFFF8:
                    return out
                nexthdr, off = frame[off], off + 8
            elif nexthdr == 51:
                nexthdr, off = frame[off], off + (frame[off + 1] + 2) * 4
            else:
                nexthdr, off = frame[off], off + (frame[off + 1] + 1) * 8
        fixed = {133: 8, 134: 16, 135: 24, 136: 24, 137: 40}
        if nexthdr == 58 and off + 4 <= end and frame[off] in fixed:
            out.mutable |= {off + 2, off + 3}
            pseudo = frame[22:54] + struct.pack("!I3xB", end - off, 58)
            out.checksums.append((pseudo, off, end))
            option = off + fixed[frame[off]]
            while option + 2 <= end and frame[option + 1]:
                if frame[option] in (1, 2):
                    out.mutable |= set(range(option + 2, min(option + 8, end)))
                    if frame[option + 1] == 1 and option + 8 <= end:
                        out.macs.append(option + 2)
                option += frame[option + 1] * 8
    return out


def checksum_ok(frame: bytes, pseudo: bytes, start: int, end: int) -> bool:
    return end <= len(frame) and internet_checksum(pseudo + frame[start:end]) == 0


def claimable(key: bytes, onlink: bool, flags: int, forbidden: set[bytes]) -> bool:
    """Whether a VM may have this address bound, by the rules of docs/design.md's security model,
    written here without the datapath's code. `forbidden`: the host's addresses and the gateway's."""
    if key in forbidden:
        return False
    if key[:12] == IPV4_MAPPED_PREFIX:
        ip = ipaddress.IPv4Address(key[12:])
        if ip.is_link_local:
            return bool(flags & constants.CFG_ALLOW_IPV4_LINK_LOCAL)
        if ip.packed[0] in (0, 127) or ip.packed[0] >= 224:
            return False
        docs = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
        if any(ip in n for n in docs) and not flags & constants.CFG_ALLOW_DOCUMENTATION:
            return False
        nets = [n for n in ONLINK if n.version == 4] if onlink else []
        return not nets or any(ip in n and ip not in (n.network_address, n.broadcast_address) for n in nets)
    ip = ipaddress.IPv6Address(key)
    if key[0] == 0 or ip.is_multicast:
        return False
    if ip.is_link_local:
        return True
    if (ip in ipaddress.ip_network("2001:db8::/32") or ip in ipaddress.ip_network("3fff::/20")) \
            and not flags & constants.CFG_ALLOW_DOCUMENTATION:
        return False
    nets = [n for n in ONLINK if n.version == 6] if onlink else []
    return not nets or any(ip in n for n in nets)


def violations(case: Case, retval: int, out: bytes, before: dict, after: dict, onlink: bool, flags: int,
               forbidden: set[bytes]) -> list[str]:
    """What the frame's run did that macnat must never do (empty: nothing)."""
    found = []
    wifi = bytes(mac_bytes(WIFI_MAC))
    if case.program == "uplink_egress" and retval == TC_ACT_REDIRECT and out[:6] != wifi:  # out to the LAN
        vms = {key[:6] for key in after["vm_macs"]} | {case.frame[6:12]}
        leaked = [at for at in layout(out).macs if out[at:at + 6] in vms]
        if leaked:
            found.append(f"a VM's MAC sent to the LAN at {leaked}")
    if retval not in VERDICTS or retval is None:
        found.append(f"return code {retval}")
    if len(out) != len(case.frame):
        found.append(f"length {len(case.frame)} -> {len(out)}")
    else:
        shape = layout(case.frame)
        changed = {i for i, (a, b) in enumerate(zip(case.frame, out)) if a != b}
        if changed - shape.mutable:
            found.append(f"bytes changed that macnat must not change: {sorted(changed - shape.mutable)}")
        for pseudo, start, end in shape.checksums:
            if changed and checksum_ok(case.frame, pseudo, start, end) and not checksum_ok(out, pseudo, start, end):
                found.append(f"checksum over {start}..{end} broken")
    if retval == TC_ACT_SHOT and before != after:
        found.append(f"tables changed by a dropped frame: {[t for t in before if before[t] != after[t]]}")
    ethertype = struct.unpack("!H", case.frame[12:14])[0]
    for key in after["bindings"].keys() - before["bindings"].keys():
        family = 0x0800 if key[:12] == IPV4_MAPPED_PREFIX else 0x86DD
        if ethertype not in ((0x0800, 0x0806) if family == 0x0800 else (0x86DD,)):
            found.append(f"a {'IPv4' if family == 0x0800 else 'IPv6'} binding from a frame of type {ethertype:#06x}")
        if not claimable(key, onlink, flags, forbidden):
            found.append(f"a binding for {ipaddress.ip_address(key[12:] if family == 0x0800 else key)}")
    return found


# ---- running frames ------------------------------------------------------------------------------

class Fuzzer:
    """Frames through the datapath, from the known state (restored every `fresh_every` frames; in
    between, what the frames teach the tables accumulates), checked one by one."""

    def __init__(self, h: Harness, onlink: bool = True, fresh_every: int = 1):
        self.h, self.onlink, self.fresh_every = h, onlink, fresh_every
        self.forbidden = {bytes(ip_key(ip)) for ip in (HOST_IP, HOST_IP6, GATEWAY_IP)}
        self.runs = 0
        self.tables: dict | None = None  # as the last frame left them

    def check(self, case: Case) -> tuple[int | None, list[str]]:
        """The frame's return code, and the invariants it broke. None for a frame BPF_PROG_TEST_RUN
        does not run: an IPv4 or IPv6 frame shorter than its network header (the kernel would not
        build such an skb for a test run; tests/test_attach.py sends one from a VM in the lab)."""
        if self.runs % self.fresh_every == 0:
            known_state(self.h, self.onlink)
            self.tables = None
        self.runs += 1
        before = self.tables or snapshot(self.h)
        try:
            run = bpfsys.prog_test_run(self.h.fds[case.program], case.frame,
                                       ctx=bpfsys.SkBuffCtx(ingress_ifindex=case.port))
        except bpfsys.BpfError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.tables = before
            return None, []
        after = self.tables = snapshot(self.h)
        return run.retval, violations(case, run.retval, run.data, before, after, self.onlink,
                                      self.h.maps.current_config().flags, self.forbidden)


@dataclass
class Report:
    frames_per_program: int
    seed: int
    seconds: float
    violations: int
    per_program: dict[str, dict] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # what the frames made the datapath count
    examples: list[dict] = field(default_factory=list)


POOL = 5000  # scapy-built frames per program that the long run mutates (building each anew costs ~1 ms)


def run(frames_per_program: int, seed: int = 1, fresh_every: int = 50, say=print) -> Report:
    """`frames_per_program` hostile frames through each program: a pool of scapy-built frames (as the
    property test draws them), each run mutated anew."""
    h = Harness(f"{netns.PREFIX}fuzz", WIFI_MAC)
    report = Report(frames_per_program, seed, 0.0, 0)
    began = time.monotonic()
    counted = h.maps.counter_totals()
    try:
        for n, program in enumerate(constants.PROGRAMS):
            fuzzer = Fuzzer(h, onlink=True, fresh_every=fresh_every)
            draw = RandomDraw(seed * 1000 + n)
            pool = [base_frame(draw, program) for _ in range(min(POOL, frames_per_program))]
            verdicts = dict.fromkeys(VERDICTS.values(), 0)
            started = time.monotonic()
            for i in range(frames_per_program):
                fuzzer.onlink = (i // fresh_every) % 4 != 3  # a quarter of the time no known on-link prefixes
                case = mutate(draw, draw.choice(pool))
                retval, found = fuzzer.check(case)
                verdicts[VERDICTS[retval]] += 1
                if found:
                    report.violations += 1
                    if len(report.examples) < 20:
                        report.examples.append({"program": program, "port": case.port, "frame": case.frame.hex(),
                                                "violations": found})
                if (i + 1) % 100_000 == 0:
                    say(f"{program}: {i + 1:,} frames, {report.violations} violations, "
                        f"{time.monotonic() - started:.0f} s")
            report.per_program[program] = {"frames": frames_per_program, **verdicts,
                                           "seconds": round(time.monotonic() - started, 1)}
        report.counters = {k: v - counted[k] for k, v in h.maps.counter_totals().items() if v != counted[k]}
    finally:
        h.close()
    report.seconds = round(time.monotonic() - began, 1)
    return report


REPORT_MARK = "<!-- python -m macnat.fuzz writes from here on; macnat bench keeps it -->"


def carried_over(markdown: str) -> str:
    """The fuzz section of a benchmarks.md (from REPORT_MARK to the end), for `macnat bench` to keep."""
    at = markdown.find(REPORT_MARK)
    return "" if at < 0 else "\n" + markdown[at:]


def render(report: Report) -> str:
    total = sum(p["frames"] for p in report.per_program.values())
    out = [REPORT_MARK, "", "## 9. Hostile frames", "",
           f"`python -m macnat.fuzz --frames {report.frames_per_program}` (seed {report.seed}, "
           f"{time.strftime('%Y-%m-%d %H:%M')}): {total:,} frames built by macnat.fuzz (a pool of {POOL:,} "
           "scapy-built frames per program, fuzzed layers, fields, options and extension headers, each run "
           "mutated anew: truncated, padded, a bit flipped, a length or an address replaced) through "
           "BPF_PROG_TEST_RUN from a known state, every invariant of issue #12 checked on each frame "
           "(docstring of src/macnat/fuzz.py). tests/test_properties.py runs the same checks with hypothesis "
           "in CI.", "",
           "| program | frames | passed | redirected | dropped | too short for a test run | seconds |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for program, f in report.per_program.items():
        out.append(f"| {program} | {f['frames']:,} | {f['ok']:,} | {f['redirected']:,} | {f['dropped']:,} | "
                   f"{f['not run']:,} | {f['seconds']:.0f} |")
    interesting = {k: v for k, v in report.counters.items() if k.startswith(("refused", "drop", "ndp", "dhcp",
                                                                              "learned", "moved", "lan", "dad"))}
    out += ["", f"**Violations found: {report.violations}**, in {report.seconds:.0f} s in all. What the frames made "
            "the datapath do (counters): " + ", ".join(f"{k} {v:,}" for k, v in sorted(interesting.items())) + ".",
            ""]
    return "\n".join(out)


def write_into(path: Path, report: Report) -> None:
    """Put (or replace) the fuzz section at the end of a benchmarks.md."""
    text = path.read_text() if path.exists() else "# macnat benchmarks\n"
    at = text.find(REPORT_MARK)
    path.write_text((text if at < 0 else text[:at]).rstrip("\n") + "\n\n" + render(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macnat.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames per program (default 10^6)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--report", type=Path, help="also write the figures into this benchmarks.md")
    args = parser.parse_args(argv)
    report = run(args.frames, args.seed, say=lambda text: print(text, file=sys.stderr))
    if args.report:
        write_into(args.report, report)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        for program, figures in report.per_program.items():
            print(f"{program}: {figures['frames']:,} frames in {figures['seconds']} s ({figures['ok']:,} passed, "
                  f"{figures['redirected']:,} redirected, {figures['dropped']:,} dropped, "
                  f"{figures['not run']:,} too short for a test run)")
        print(f"violations: {report.violations} (seed {report.seed}, {report.seconds} s in all)")
        for example in report.examples:
            print(json.dumps(example))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
