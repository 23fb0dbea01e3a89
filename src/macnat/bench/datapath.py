"""Per-packet cost of each datapath path, and its growth with the binding table, by BPF_PROG_TEST_RUN,
next to an empty TC program measured in the same rounds.

BPF_PROG_TEST_RUN repeats a program on the same buffer, so a path that rewrites the frame would take
another path from the second repetition on. Each path is therefore set up so that its rewrite
writes the bytes already there: for VM -> Wi-Fi the Wi-Fi MAC is configured as the VM's own MAC, for
Wi-Fi -> VM the binding points at the Wi-Fi MAC. The loads, lookups, stores and redirects are the
same on every repetition. The DHCP request sets the broadcast flag on the first repetition only;
its steady state is the parse and check of a request that already has it.
"""

from __future__ import annotations

import ipaddress
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from scapy.all import ARP, BOOTP, DHCP, IP, UDP, Ether, Raw
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6

from macnat import constants, netns
from macnat.harness import TC_ACT_OK, TC_ACT_REDIRECT, Harness
from macnat.maps import Binding, IpAddr, ip_key, mac_bytes

WIFI, VM, LAN = "02:4d:4e:00:00:0a", "52:54:00:00:01:01", "02:4d:4e:00:00:14"
HOST_IP, VM_IP, LAN_IP = "192.168.77.10", "192.168.77.101", "192.168.77.20"
HOST_IP6, VM_IP6, LAN_IP6 = "fd77:77::10", "fd77:77::5054:ff:fe00:101", "fd77:77::20"
FROM_A_VM_PORT = 1000   # ingress ifindex of a frame that entered the bridge through a port
PAYLOAD = Raw(b"\0" * 18)  # 64-byte frames for the IPv4 UDP paths


def vm_sends(h: Harness) -> None:
    h.set_wifi_mac(VM)
    h.bind(VM_IP, VM)
    h.bind(VM_IP6, VM)


def wifi_delivers(h: Harness) -> None:
    h.set_wifi_mac(WIFI)
    h.bind(VM_IP, WIFI)
    h.bind(VM_IP6, WIFI)


@dataclass(frozen=True)
class Path:
    name: str
    program: str
    frame: bytes
    prepare: Callable[[Harness], None]
    expect: int
    fast: bool            # a per-packet path of bulk traffic (the <= 4x target), not signalling
    ingress_ifindex: int = 0
    mark: int = 0         # skb->mark the frame arrives with


PATHS = [
    Path("Wi-Fi -> VM, IPv4 unicast", "wifi_ingress",
         bytes(Ether(src=LAN, dst=WIFI) / IP(src=LAN_IP, dst=VM_IP) / UDP(sport=9, dport=9) / PAYLOAD),
         wifi_delivers, TC_ACT_REDIRECT, True),
    Path("VM -> Wi-Fi, IPv4 unicast", "uplink_egress",
         bytes(Ether(src=VM, dst=LAN) / IP(src=VM_IP, dst=LAN_IP) / UDP(sport=9, dport=9) / PAYLOAD),
         vm_sends, TC_ACT_REDIRECT, True, FROM_A_VM_PORT),
    Path("Wi-Fi -> VM, IPv6 unicast", "wifi_ingress",
         bytes(Ether(src=LAN, dst=WIFI) / IPv6(src=LAN_IP6, dst=VM_IP6) / UDP(sport=9, dport=9) / PAYLOAD),
         wifi_delivers, TC_ACT_REDIRECT, True),
    Path("VM -> Wi-Fi, IPv6 unicast", "uplink_egress",
         bytes(Ether(src=VM, dst=LAN) / IPv6(src=VM_IP6, dst=LAN_IP6) / UDP(sport=9, dport=9) / PAYLOAD),
         vm_sends, TC_ACT_REDIRECT, True, FROM_A_VM_PORT),
    Path("Wi-Fi -> host, passthrough", "wifi_ingress",
         bytes(Ether(src=LAN, dst=WIFI) / IP(src=LAN_IP, dst=HOST_IP) / UDP(sport=9, dport=9) / PAYLOAD),
         wifi_delivers, TC_ACT_OK, True),
    Path("host -> VM (wlan0 egress)", "wifi_egress",
         bytes(Ether(src=WIFI, dst=VM) / IP(src=HOST_IP, dst=VM_IP) / UDP(sport=9, dport=9) / PAYLOAD),
         vm_sends, TC_ACT_REDIRECT, True),
    Path("host -> LAN, passthrough (wlan0 egress)", "wifi_egress",
         bytes(Ether(src=WIFI, dst=LAN) / IP(src=HOST_IP, dst=LAN_IP) / UDP(sport=9, dport=9) / PAYLOAD),
         vm_sends, TC_ACT_OK, True),
    Path("VM -> Wi-Fi, then wlan0 egress (marked by uplink_egress)", "wifi_egress",
         bytes(Ether(src=WIFI, dst=LAN) / IP(src=VM_IP, dst=LAN_IP) / UDP(sport=9, dport=9) / PAYLOAD),
         vm_sends, TC_ACT_OK, True, mark=constants.MARK_FROM_VMS),
    Path("Wi-Fi -> VM, ARP reply", "wifi_ingress",
         bytes(Ether(src=LAN, dst=WIFI) / ARP(op=2, hwsrc=LAN, psrc=LAN_IP, hwdst=WIFI, pdst=VM_IP)),
         wifi_delivers, TC_ACT_REDIRECT, False),
    Path("VM -> Wi-Fi, ARP reply", "uplink_egress",
         bytes(Ether(src=VM, dst=LAN) / ARP(op=2, hwsrc=VM, psrc=VM_IP, hwdst=LAN, pdst=LAN_IP)),
         vm_sends, TC_ACT_REDIRECT, False, FROM_A_VM_PORT),
    Path("VM -> Wi-Fi, NDP NA with target LLA", "uplink_egress",
         bytes(Ether(src=VM, dst=LAN) / IPv6(src=VM_IP6, dst=LAN_IP6, hlim=255)
               / ICMPv6ND_NA(tgt=VM_IP6, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=VM)),
         vm_sends, TC_ACT_REDIRECT, False, FROM_A_VM_PORT),
    Path("VM -> Wi-Fi, DHCP request (renewal)", "uplink_egress",
         bytes(Ether(src=VM, dst=LAN) / IP(src=VM_IP, dst=LAN_IP) / UDP(sport=68, dport=67)
               / BOOTP(op=1, ciaddr=VM_IP, chaddr=mac_bytes(VM)) / DHCP(options=[("message-type", "request"), "end"])),
         vm_sends, TC_ACT_REDIRECT, False, FROM_A_VM_PORT),
    Path("Wi-Fi -> VMs and host, broadcast (copied into the bridge)", "wifi_ingress",
         bytes(Ether(src=LAN, dst="ff:ff:ff:ff:ff:ff") / IP(src=LAN_IP, dst="255.255.255.255")
               / UDP(sport=137, dport=137) / PAYLOAD),
         wifi_delivers, TC_ACT_OK, False),
]
SCALED = [p for p in PATHS if p.name in ("Wi-Fi -> VM, IPv4 unicast", "VM -> Wi-Fi, IPv4 unicast",
                                         "Wi-Fi -> VM, IPv6 unicast", "VM -> Wi-Fi, IPv6 unicast")]
TABLE_SIZES = (10, 1000, 65536)


@dataclass
class Cost:
    name: str
    fast: bool
    ns: float              # median over rounds
    ratio: float           # median of the per-round ratios to the empty program
    spread: tuple[float, float]  # min and max of those ratios


def measure(h: Harness, empty_fd: int, paths: list[Path], repeat: int, rounds: int) -> tuple[float, list[Cost]]:
    """(empty program ns, per path costs); every round measures the empty program and each path."""
    empty, per_path = [], {p.name: [] for p in paths}
    for _ in range(rounds):
        e = h.run(empty_fd, paths[0].frame, repeat=repeat).ns_per_run
        empty.append(e)
        for p in paths:
            p.prepare(h)
            run = h.run(p.program, p.frame, p.ingress_ifindex, repeat=repeat, mark=p.mark)
            if run.retval != p.expect:
                raise RuntimeError(f"{p.name}: return code {run.retval}, expected {p.expect}")
            per_path[p.name].append((run.ns_per_run, run.ns_per_run / e))
    costs = []
    for p in paths:
        ratios = [r for _, r in per_path[p.name]]
        costs.append(Cost(p.name, p.fast, statistics.median(ns for ns, _ in per_path[p.name]),
                          statistics.median(ratios), (min(ratios), max(ratios))))
    return statistics.median(empty), costs


def fill_bindings(h: Harness, count: int) -> None:
    """`count` bindings besides the measured ones: IPv4 and IPv6 addresses, as a busy LAN would have."""
    filler = Binding(mac=mac_bytes("52:54:00:ff:ff:ff"), last_seen_ns=1)
    base4, base6 = int(ipaddress.IPv4Address("10.0.0.0")), int(ipaddress.IPv6Address("fd00:1::"))
    for i in range(count):
        key = ip_key(str(ipaddress.IPv4Address(base4 + i))) if i % 2 else \
            IpAddr.from_buffer_copy(ipaddress.IPv6Address(base6 + i).packed)
        h.maps.bindings.update(key, filler)


def run(repeat: int, rounds: int) -> dict:
    h = Harness(f"{netns.PREFIX}bench-dp", WIFI)
    try:
        h.reset(host_addresses=(HOST_IP, HOST_IP6))
        empty_fd = h.empty_program_fd()
        empty_ns, costs = measure(h, empty_fd, PATHS, repeat, rounds)
        scale = {}
        for size in TABLE_SIZES:
            h.reset(host_addresses=(HOST_IP, HOST_IP6))
            fill_bindings(h, size - 2)  # the measured VM's two addresses complete the count
            _, scaled = measure(h, empty_fd, SCALED, repeat, rounds)
            scale[size] = {c.name: c.ns for c in scaled}
        return {"empty_ns": empty_ns, "repeat": repeat, "rounds": rounds, "paths": costs, "scale": scale}
    finally:
        h.close()
