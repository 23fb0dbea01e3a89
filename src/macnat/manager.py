"""The manager: keeps the datapath's tables right while the datapath forwards on its own.

The datapath learns bindings itself, at line rate and before forwarding the frame that taught it.
The manager does what needs time or the rest of the system:
- protects the host's own IPv4 addresses (watched over netlink): the datapath refuses VM frames
  claiming them, and a binding that collides with a newly added host address is removed;
- follows the Wi-Fi interface's MAC when it changes;
- ages learned bindings: an idle one is probed with unicast ARP (power-saving clients ignore
  broadcast probes) and removed when the probes go unanswered; static bindings never age;
- installs the LAN MACs that talk to VMs as static FDB entries on the uplink port, so the bridge
  stops flooding VM frames to them across all VM ports;
- logs what was learned, moved, expired and refused;
- its part of the security model (docs/design.md): releasing a removed bridge port's MACs, the per-port
  released counts, the on-link prefixes and the pinned gateways, ageing LAN addresses and DHCP requests,
  probing the owner of a claimed address, and rate-limited log lines from the datapath's events. Each
  is a small class or function below the packet builders, apart from the Manager that calls them.
If the manager dies, the datapath keeps forwarding with what it has, and a new manager adopts it.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from macnat import attachment, constants, netlink
from macnat.attachment import Attachment
from macnat.errors import MacnatError
from macnat.maps import (IPV4_MAPPED_PREFIX, Binding, IpAddr, LanAddr, LanMac, MacAddr, Maps, OnlinkKey,
                         OnlinkPrefix, PortCounts, ip_family, ip_key, ip_str, mac_bytes, mac_str, u8, u32)

log = logging.getLogger("macnat")

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
ICMPV6_NEIGHBOUR_SOLICIT = 135
ND_OPT_SOURCE_LL = 1


@dataclass
class Settings:
    age: float = 300.0                 # seconds a learned binding lives without traffic from its VM
    probes: int = 3                    # unicast ARP probes an idle binding gets before it expires
    tick: float = 1.0                  # seconds between table sweeps
    statics: dict[str, str] = field(default_factory=dict)  # IPv4 -> MAC, never aged or moved
    # Per-port limits and address policy, written into the config map (0: the datapath's defaults,
    # constants.PORT_MAX_*).
    max_macs_per_port: int = 0
    max_ipv4_per_port: int = 0
    max_ipv6_per_port: int = 0
    allow_ipv4_link_local: bool = False   # VMs may use 169.254.0.0/16
    allow_documentation: bool = False     # VMs may use 192.0.2.0/24, 2001:db8::/32, ...

    @property
    def probe_interval(self) -> float:
        return max(self.tick, self.age / 10)


@dataclass(frozen=True)
class ProbeSource:
    """What an idle VM's probe comes from: wlan0's MAC and addresses."""

    mac: bytes
    ipv4: bytes           # 0.0.0.0 when wlan0 has no IPv4 address
    ipv6: bytes | None    # wlan0's link-local address; no IPv6 probes without one


CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; Python's time module does not name it


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns(), which stamps last_seen_ns (the coarse one: a frame seen
    just after this call never carries an earlier stamp)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def arp_request(dst_mac: bytes, src_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    frame = (dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + sender_ip + bytes(6) + target_ip)
    return frame.ljust(60, b"\0")


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def neighbour_solicitation(dst_mac: bytes, src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    """A unicast NS (RFC 4861 7.2.2, as for NUD) to target_ip, with our MAC as source link-layer address."""
    icmp = struct.pack("!BBHI", ICMPV6_NEIGHBOUR_SOLICIT, 0, 0, 0) + target_ip + bytes([ND_OPT_SOURCE_LL, 1]) + src_mac
    pseudo_header = src_ip + target_ip + struct.pack("!I3xB", len(icmp), IPPROTO_ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(pseudo_header + icmp)) + icmp[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(icmp), IPPROTO_ICMPV6, 255) + src_ip + target_ip
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + icmp


# ---- security duties (issue #12) ----------------------------------------------------------------
# Each works on the maps alone (plus what it is handed), so it can be tested on the datapath harness.

OWNER_ANSWER_S = 2.0            # the owner of a claimed address has this long to answer its probe
SECURITY_LOG_INTERVAL_S = 10.0  # one summary line per offender and kind of event per interval


def apply_security_settings(maps: Maps, settings: Settings) -> None:
    """Write the per-port limits and the address policy into the config map (the loader leaves them
    zero, which the datapath reads as its defaults)."""
    config = maps.current_config()
    config.max_macs_per_port = settings.max_macs_per_port
    config.max_ipv4_per_port = settings.max_ipv4_per_port
    config.max_ipv6_per_port = settings.max_ipv6_per_port
    policy = constants.CFG_ALLOW_IPV4_LINK_LOCAL | constants.CFG_ALLOW_DOCUMENTATION
    config.flags = (config.flags & ~policy) \
        | (constants.CFG_ALLOW_IPV4_LINK_LOCAL if settings.allow_ipv4_link_local else 0) \
        | (constants.CFG_ALLOW_DOCUMENTATION if settings.allow_documentation else 0)
    maps.config.update(u32(0), config)


def write_released_counts(maps: Maps) -> dict[int, dict[str, int]]:
    """The manager's half of the per-port accounting (the datapath's half: struct port_state in
    bpf/macnat.h). Each port's learned counts are read first, then what the tables hold for the port is
    counted, and released = learned - held is written to port_released. The datapath only ever adds to
    learned and the manager only ever writes released, so no update is lost between them; what is
    learned during the scan counts twice until the next sweep, which errs on refusing. Static bindings
    are the user's and count for no port. Returns what the tables hold, per port and kind."""
    learned = {key.value: list(state.learned.count) for key, state in maps.ports.items()}
    kinds = constants.PORT_COUNTS
    held = {port: dict.fromkeys(kinds, 0) for port in learned}

    def hold(port: int, kind: str) -> None:
        if port in held:
            held[port][kind] += 1

    for _, vm in maps.vm_macs.items():
        hold(vm.port, "macs")
    for key, binding in maps.bindings.items():
        if not binding.flags & constants.BINDING_STATIC:
            hold(binding.port, ip_family(key))
    for _, request in maps.dhcp_requests.items():
        hold(request.port, "dhcp_requests")
    for port, counts in learned.items():
        released = [(count - held[port][kind]) % 2**64 for count, kind in zip(counts, kinds)]
        current = maps.port_released.lookup(u32(port))
        if current is None or list(current.count) != released:
            maps.port_released.update(u32(port), PortCounts(count=(ctypes.c_uint64 * len(kinds))(*released)))
    return held


def release_gone_ports(maps: Maps, present: set[int]) -> dict[int, list[str]]:
    """A bridge port that went away releases its MACs and their bindings (a VM that comes back on a new
    port with the same MAC is itself again at once), its DHCP requests and its per-port state. Static
    bindings stay, their MACs re-installed by the caller for the next port to take. Bindings go
    before MACs, so that no frame finds a binding whose MAC is gone; port_released goes before ports,
    so that a port's usage never reads an old release against fresh counts. Returns the MACs each
    released port had."""
    gone = {key.value for key in maps.ports.keys() if key.value and key.value not in present}
    gone |= {vm.port for _, vm in maps.vm_macs.items() if vm.port and vm.port not in present}
    if not gone:
        return {}
    for key, binding in maps.bindings.items():
        if binding.port in gone and not binding.flags & constants.BINDING_STATIC:
            maps.bindings.delete(key)
    released: dict[int, list[str]] = {port: [] for port in gone}
    for key, vm in maps.vm_macs.items():
        if vm.port in gone:
            maps.vm_macs.delete(key)
            released[vm.port].append(mac_str(key.addr))
    for key, request in maps.dhcp_requests.items():
        if request.port in gone:
            maps.dhcp_requests.delete(key)
    for port in gone:
        maps.port_released.delete(u32(port))
        maps.ports.delete(u32(port))
    return released


def onlink_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> OnlinkKey:
    """An on-link prefix as the onlink trie keys it: IPv4 mapped into IPv6, so a /24 is a /120."""
    if network.version == 4:
        return OnlinkKey(prefixlen=96 + network.prefixlen, addr=ip_key(str(network.network_address)))
    return OnlinkKey(prefixlen=network.prefixlen, addr=IpAddr.from_buffer_copy(network.network_address.packed))


def sync_onlink_prefixes(maps: Maps, prefixes: set) -> bool:
    """Fill the onlink trie with the Wi-Fi LAN's on-link prefixes and tell the datapath, per family,
    whether it knows them (CFG_ONLINK_IPV4/IPV6): a family without one accepts any plausible unicast.
    Link-local prefixes do not count (those addresses are on-link by definition). Prefixes are added
    before a family's flag is set and removed after it is cleared. Returns whether anything changed."""
    wanted = {(k.prefixlen, bytes(k.addr)): k for k in (onlink_key(n) for n in prefixes if not n.is_link_local)}
    current = {(k.prefixlen, bytes(k.addr)): k for k in maps.onlink.keys()}
    flags = 0
    for prefixlen, addr in wanted:
        flags |= constants.CFG_ONLINK_IPV4 if addr[:12] == IPV4_MAPPED_PREFIX and prefixlen >= 96 \
            else constants.CFG_ONLINK_IPV6
    for key in wanted.keys() - current.keys():
        maps.onlink.update(wanted[key], OnlinkPrefix(prefixlen=key[0]))
    config = maps.current_config()
    families = constants.CFG_ONLINK_IPV4 | constants.CFG_ONLINK_IPV6
    changed = (config.flags & families) != flags or wanted.keys() != current.keys()
    if config.flags & families != flags:
        config.flags = (config.flags & ~families) | flags
        maps.config.update(u32(0), config)
    for key in current.keys() - wanted.keys():
        maps.onlink.delete(current[key])
    return changed


class GatewayPins:
    """The LAN's gateways (the host's default routes through the Wi-Fi) are pinned in lan_addrs, and
    their MACs, once the host's neighbour table has them, in lan_macs: no VM can claim either, and no
    flood ages or evicts them. A VM that already holds a gateway's address or MAC loses it. A gateway
    that no longer is one is unpinned and ages like any LAN address."""

    def __init__(self, maps: Maps):
        self.maps = maps
        self.pinned: dict[str, str | None] = {}

    def sync(self, gateways: dict[str, str | None], now_ns: int) -> None:
        if gateways == self.pinned:
            return
        for ip, mac in gateways.items():
            key = ip_key(ip)
            binding = self.maps.bindings.lookup(key)
            if binding is not None and not binding.flags & constants.BINDING_STATIC:
                self.maps.bindings.delete(key)
                log.warning("%s is the LAN's gateway: removed its binding to VM %s", ip, mac_str(binding.mac))
            self.maps.lan_addrs.update(key, LanAddr(last_seen_ns=now_ns, mac=mac_bytes(mac or "00:00:00:00:00:00"),
                                                    flags=constants.LAN_PINNED))
            if mac:
                self._pin_mac(ip, mac, now_ns)
        for ip, mac in self.pinned.items():
            if ip not in gateways:
                self._unpin(self.maps.lan_addrs, ip_key(ip))
            if mac and mac not in gateways.values():
                self._unpin(self.maps.lan_macs, MacAddr(mac_bytes(mac)))
        self.pinned = dict(gateways)

    def _pin_mac(self, ip: str, mac: str, now_ns: int) -> None:
        key = MacAddr(mac_bytes(mac))
        if self.maps.vm_macs.lookup(key) is not None:
            for bkey, binding in self.maps.bindings.items():
                if bytes(binding.mac) == bytes(key.addr):
                    self.maps.bindings.delete(bkey)
            self.maps.vm_macs.delete(key)
            log.warning("%s is the MAC of the LAN's gateway %s: it is no VM's any more", mac, ip)
        self.maps.lan_macs.update(key, LanMac(last_seen_ns=now_ns, flags=constants.LAN_PINNED))

    @staticmethod
    def _unpin(table, key) -> None:
        value = table.lookup(key)
        if value is not None and value.flags & constants.LAN_PINNED:
            value.flags &= ~constants.LAN_PINNED
            table.update(key, value)


class VmFdb:
    """Each VM MAC in the bridge's FDB, static and sticky, on the port the datapath saw it on. The
    datapath drops a VM's frame with another's MAC (a VM's, the host's, the gateway's) at the uplink,
    but the bridge has learned from it by then: without a sticky entry the MAC's traffic would go to
    the impostor's port. An entry goes when its MAC leaves vm_macs (its port's entries go with the port)."""

    def __init__(self, ipr: IPRoute, maps: Maps):
        self.ipr, self.maps = ipr, maps
        self.installed: dict[str, int] = {}  # mac -> port

    def sync(self) -> None:
        wanted = {mac_str(key.addr): vm.port for key, vm in self.maps.vm_macs.items() if vm.port}
        for mac, port in wanted.items():
            if self.installed.get(mac) != port:
                try:
                    netlink.fdb_set(self.ipr, port, mac)
                except NetlinkError as exc:  # the port went away meanwhile
                    log.debug("no FDB entry for %s on port %d: %s", mac, port, exc)
                    wanted[mac] = None
        for mac, port in self.installed.items():
            if port and wanted.get(mac) != port:
                netlink.fdb_del(self.ipr, port, mac)
        self.installed = {mac: port for mac, port in wanted.items() if port}


def age_lan_addresses(maps: Maps, now_ns: int, age_ns: float) -> None:
    """LAN addresses not seen for `age_ns` go (a VM may then claim them); pinned ones stay."""
    for key, seen in maps.lan_addrs.items():
        if not seen.flags & constants.LAN_PINNED and now_ns - seen.last_seen_ns >= age_ns:
            maps.lan_addrs.delete(key)


def age_dhcp_requests(maps: Maps, now_ns: int) -> None:
    """DHCP requests older than their use (a DHCPACK binds at once only within DHCP_REQUEST_TTL_S) go."""
    for key, request in maps.dhcp_requests.items():
        if now_ns - request.time_ns >= constants.DHCP_REQUEST_TTL_S * 1e9:
            maps.dhcp_requests.delete(key)


@dataclass
class PendingProbe:
    owner: bytes
    claimant: bytes
    sent_ns: int


class ClaimProbes:
    """A learned binding moves from one VM to another only when its owner is gone. The datapath
    refuses the claim and records it (refusals, reason refused_claim, with the owner); here the owner is
    probed with unicast ARP or NS, and if within OWNER_ANSWER_S no frame of the owner's refreshed the
    binding, it is deleted: the claimant's next frame binds the address. An owner that answers keeps
    it. `probe(ip, binding)` sends the probe."""

    def __init__(self, maps: Maps, probe, answer_s: float = OWNER_ANSWER_S):
        self.maps, self.probe, self.answer_ns = maps, probe, answer_s * 1e9
        self.seen: dict[str, tuple[int, int]] = {}    # ip -> (count, last_ns) of its claim record
        self.pending: dict[str, PendingProbe] = {}

    def sweep(self, now_ns: int) -> None:
        records = {}
        for key, refusal in self.maps.refusals.items():
            if refusal.reason != constants.COUNTER_INDEX["refused_claim"]:
                continue
            ip = ip_str(key)
            records[ip] = (refusal.count, refusal.last_ns)
            if self.seen.get(ip) == records[ip] or ip in self.pending:
                continue
            binding = self.maps.bindings.lookup(key)
            if binding is None or bytes(binding.mac) != bytes(refusal.owner) or binding.flags & constants.BINDING_STATIC:
                continue
            self.pending[ip] = PendingProbe(bytes(refusal.owner), bytes(refusal.mac), monotonic_ns())
            self.probe(ip, binding)
        self.seen = records
        for ip, pending in list(self.pending.items()):
            if now_ns - pending.sent_ns < self.answer_ns:
                continue
            del self.pending[ip]
            binding = self.maps.bindings.lookup(ip_key(ip))
            if binding is None or bytes(binding.mac) != pending.owner:
                continue  # gone or moved meanwhile (a DHCPACK, ageing)
            owner, claimant = mac_str(pending.owner), mac_str(pending.claimant)
            if binding.last_seen_ns >= pending.sent_ns:
                log.warning("VM %s claims %s, which VM %s has and still answers for: kept", claimant, ip, owner)
            else:
                self.maps.bindings.delete(ip_key(ip))
                log.warning("VM %s claims %s from VM %s, which did not answer its probe: released", claimant, ip,
                            owner)


WHY_REFUSED = {
    "refused_host_ip": "an address of this host",
    "refused_static": "statically bound to another VM",
    "refused_claim": "bound to another VM (its owner is probed)",
    "refused_lan_ip": "an address the LAN uses",
    "refused_address": "no address a VM may have",
}


class SecurityLog:
    """Log lines from the datapath's events, rate-limited: the first event of a kind from an offender
    (a VM's bridge port, whatever MACs it forges; on the LAN side, a MAC) is logged at once, the others
    of the same interval only counted and summarised in one line when SECURITY_LOG_INTERVAL_S is over;
    events the datapath suppressed (its per-port rate limit) are summarised per port. Learning events
    are left to the table diff (age_bindings)."""

    QUIET = {"learned_mac", "learned_ip", "moved_ip"}

    def __init__(self, maps: Maps, port_name, host_addrs, interval_s: float = SECURITY_LOG_INTERVAL_S):
        self.maps, self.port_name, self.host_addrs = maps, port_name, host_addrs
        self.interval_ns = interval_s * 1e9
        self.window: dict[tuple, list] = {}           # offender and kind -> [first_ns, more, first line]
        self.suppressed: dict[int, int] = {}          # port -> its events_suppressed, as last reported

    def drain(self, now_ns: int) -> None:
        for event in self.maps.events():
            kind = event.kind_name
            if kind in self.QUIET:
                continue
            key = (event.port, kind) if event.port else (0, kind, bytes(event.mac))
            if key in self.window:
                self.window[key][1] += 1
                continue
            line = self.describe(event, kind)
            log.warning("%s", line)
            self.window[key] = [now_ns, 0, line]
        for key, (first_ns, more, line) in list(self.window.items()):
            if now_ns - first_ns >= self.interval_ns:
                del self.window[key]
                if more:
                    log.warning("... and %d more like it in the last %g s: %s", more, self.interval_ns / 1e9, line)
        for key, state in self.maps.ports.items():
            last = self.suppressed.get(key.value, 0)
            if state.events_suppressed > last:
                log.warning("%s sent more events than its rate allows: %d not reported", self.port_name(key.value),
                            state.events_suppressed - last)
            self.suppressed[key.value] = state.events_suppressed

    def describe(self, event, kind: str) -> str:
        mac, other, ip, port = mac_str(event.mac), mac_str(event.other), ip_str(event.ip), self.port_name(event.port)
        if kind in WHY_REFUSED:
            why = WHY_REFUSED[kind]
            if kind == "refused_host_ip":
                why += f" ({self.host_addrs().get(ip, '?')})"
            elif kind in ("refused_claim", "refused_static"):
                why += f": {other}"
            return f"refused: VM {mac} claims {ip}, {why} (on {port})"
        if kind.startswith("refused_limit_"):
            return f"refused: VM {mac} on {port}: the port is at its limit of {kind.removeprefix('refused_limit_')}"
        if kind.startswith("refused_mac_"):
            whose = {"refused_mac_port": "another port's", "refused_mac_wifi": "the Wi-Fi interface's",
                     "refused_mac_lan": "a LAN host's"}[kind]
            return f"refused: frames from {port} with source MAC {mac}, {whose}"
        if kind == "dad_conflict":
            return f"LAN host {other} probes (DAD) {ip} of VM {mac}: the binding goes until the VM defends it"
        if kind == "lan_ip_conflict":
            return f"LAN host {mac} uses {ip}, bound to VM {other} (on {port})"
        if kind == "dhcp_ack_unmatched":
            return f"DHCPACK from {mac} giving {ip} to {other} answers no request of that VM: ignored"
        return f"{kind}: {mac} {ip} (on {port})"


class Manager:
    def __init__(self, attachment: Attachment, settings: Settings):
        self.attachment = attachment
        self.settings = settings
        self.maps = attachment.maps
        self.ipr = IPRoute()
        self.known: dict[str, str] = {}            # bindings as last reported: ip -> mac
        self.refused: dict[str, int] = {}          # refusal counts as last reported
        self.probed_at: dict[str, float] = {}      # ip -> monotonic seconds of the last probe
        self.lan_fdb: set[str] = set()
        self.host_addrs: dict[str, str] = {}
        self.probe_socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.probe_socket.bind((attachment.bridge.name, 0))
        self.port_names: dict[int, str] = {}
        self.gateway_pins = GatewayPins(self.maps)
        self.vm_fdb = VmFdb(self.ipr, self.maps)
        self.claims = ClaimProbes(self.maps, lambda ip, binding: self.probe(ip, binding, self.probe_source()))
        self.security_log = SecurityLog(self.maps, self.port_name, lambda: self.host_addrs)

    # ---- start-up -------------------------------------------------------------------------
    def start(self) -> None:
        config = self.maps.current_config()
        self.lan_fdb = netlink.fdb_static_macs(self.ipr, self.attachment.uplink.index) - {mac_str(config.wifi_mac)}
        self.known = {ip_str(k): mac_str(v.mac) for k, v in self.maps.bindings.items()}
        if self.known:
            log.info("adopted %d bindings: %s", len(self.known),
                     ", ".join(f"{ip} at {mac}" for ip, mac in sorted(self.known.items())))
        self.sync_host_addresses()
        self.follow_wifi_mac()
        apply_security_settings(self.maps, self.settings)
        self.follow_the_lan(monotonic_ns())
        self.release_gone_ports()

    def install_statics(self) -> None:
        """Static bindings, and their VMs' MACs for the first bridge port that uses them (a MAC that a
        port already has stays that port's; a binding already installed keeps its counters)."""
        now = monotonic_ns()
        for ip, mac in self.settings.statics.items():
            if ip in self.host_addrs:
                log.warning("static binding %s refused: it is an address of this host (%s)", ip, self.host_addrs[ip])
                continue
            if self.maps.vm_macs.lookup(MacAddr(mac_bytes(mac))) is None:
                self.maps.add_vm_mac(mac_bytes(mac), last_seen_ns=now)
            current = self.maps.bindings.lookup(ip_key(ip))
            if current is not None and current.flags & constants.BINDING_STATIC and mac_str(current.mac) == mac:
                continue
            self.maps.bindings.update(ip_key(ip), Binding(mac=mac_bytes(mac), flags=constants.BINDING_STATIC,
                                                          last_seen_ns=now))
            log.info("static binding %s at %s", ip, mac)

    def release_gone_ports(self) -> None:
        """Release the MACs and bindings of bridge ports that went away (release_gone_ports), then
        (re)install the static bindings."""
        present = netlink.bridge_ports(self.ipr, self.attachment.bridge.index)
        self.port_names.update(present)  # a port's name is known once it is gone
        for port, macs in release_gone_ports(self.maps, set(present)).items():
            log.info("%s is gone: released its MACs %s", self.port_names.pop(port, f"port {port}"),
                     ", ".join(macs) or "(none)")
        self.install_statics()

    def follow_the_lan(self, now_ns: int) -> None:
        """The Wi-Fi's on-link prefixes and gateways, from the host's addresses, routes and neighbours."""
        index = self.attachment.wifi.index
        prefixes = netlink.onlink_prefixes(self.ipr, index)
        if sync_onlink_prefixes(self.maps, prefixes):
            log.info("on-link prefixes of %s: %s", self.attachment.wifi.name,
                     ", ".join(sorted(str(n) for n in prefixes)) or "none known")
        self.gateway_pins.sync(netlink.gateways(self.ipr, index), now_ns)

    def port_name(self, index: int) -> str:
        if index == 0:
            return "the LAN"
        if index not in self.port_names:
            link = netlink.link_by_index(self.ipr, index)
            self.port_names[index] = link.name if link else f"port {index}"
        return self.port_names[index]

    # ---- netlink-driven -------------------------------------------------------------------
    def sync_host_addresses(self) -> None:
        wanted = netlink.host_addresses(self.ipr)
        current = {ip_str(k) for k in self.maps.host_addrs.keys()}
        for ip in wanted.keys() - current:
            self.maps.host_addrs.update(ip_key(ip), u8(1))
            binding = self.maps.bindings.lookup(ip_key(ip))
            if binding is not None:
                self.maps.bindings.delete(ip_key(ip))
                self.known.pop(ip, None)
                log.warning("%s is now an address of this host (%s): removed its binding to VM %s",
                            ip, wanted[ip], mac_str(binding.mac))
        for ip in current - wanted.keys():
            self.maps.host_addrs.delete(ip_key(ip))
        self.host_addrs = wanted

    def follow_wifi_mac(self) -> None:
        config = self.maps.current_config()
        wifi = netlink.link_by_index(self.ipr, self.attachment.wifi.index)
        old = mac_str(config.wifi_mac)
        if wifi is None or wifi.mac == old:
            return
        config.wifi_mac = mac_bytes(wifi.mac)
        self.maps.config.update(u32(0), config)
        netlink.fdb_del(self.ipr, self.attachment.uplink.index, old)
        netlink.fdb_set(self.ipr, self.attachment.uplink.index, wifi.mac)
        log.info("%s changed its MAC from %s to %s: VM frames now leave with the new one", wifi.name, old, wifi.mac)

    # ---- periodic -------------------------------------------------------------------------
    def sweep(self) -> None:
        now_ns = monotonic_ns()
        self.age_bindings(now_ns)
        self.age_vm_macs(now_ns)
        self.sync_lan_fdb(now_ns)
        self.vm_fdb.sync()
        self.follow_the_lan(now_ns)
        age_lan_addresses(self.maps, now_ns, self.settings.age * 1e9)
        age_dhcp_requests(self.maps, now_ns)
        write_released_counts(self.maps)
        self.claims.sweep(now_ns)
        self.security_log.drain(now_ns)

    def age_bindings(self, now_ns: int) -> None:
        age_ns = self.settings.age * 1e9
        probe_from_ns = age_ns - self.settings.probes * self.settings.probe_interval * 1e9
        current: dict[str, str] = {}
        source: ProbeSource | None = None  # read once a sweep, when a probe is due
        for key, binding in self.maps.bindings.items():
            ip, mac = ip_str(key), mac_str(binding.mac)
            if binding.flags & constants.BINDING_STATIC:
                current[ip] = mac
                continue
            idle_ns = now_ns - binding.last_seen_ns
            if idle_ns >= age_ns:
                self.maps.bindings.delete(key)
                self.probed_at.pop(ip, None)
                log.info("expired %s at %s: silent for %.0f s", ip, mac, idle_ns / 1e9)
                continue
            current[ip] = mac
            if idle_ns >= probe_from_ns:
                if self.probe_due(ip):
                    source = source or self.probe_source()
                    self.probe(ip, binding, source)
            else:
                self.probed_at.pop(ip, None)
        for ip, mac in current.items():
            old = self.known.get(ip)
            if old is None:
                log.info("learned %s at %s", ip, mac)
            elif old != mac:
                log.info("%s moved from %s to %s", ip, old, mac)
        self.known = current

    def probe_due(self, ip: str) -> bool:
        last = self.probed_at.get(ip)
        return last is None or time.monotonic() - last >= self.settings.probe_interval

    def probe_source(self) -> ProbeSource:
        index = self.attachment.wifi.index
        ipv4 = netlink.interface_address(self.ipr, index, socket.AF_INET) or "0.0.0.0"
        ipv6 = netlink.interface_address(self.ipr, index, socket.AF_INET6, link_local=True)
        return ProbeSource(mac=bytes(self.maps.current_config().wifi_mac), ipv4=socket.inet_aton(ipv4),
                           ipv6=socket.inet_pton(socket.AF_INET6, ipv6) if ipv6 else None)

    def probe(self, ip: str, binding: Binding, source: ProbeSource) -> None:
        """Ask an idle VM whether it still has `ip`: its answer refreshes the binding in the datapath."""
        vm_mac = bytes(binding.mac)
        if ":" in ip:
            if source.ipv6 is None:
                log.debug("cannot probe %s: %s has no IPv6 link-local address", ip, self.attachment.wifi.name)
                return
            frame = neighbour_solicitation(vm_mac, source.mac, source.ipv6, socket.inet_pton(socket.AF_INET6, ip))
        else:
            frame = arp_request(vm_mac, source.mac, source.ipv4, socket.inet_aton(ip))
        try:
            self.probe_socket.send(frame)
        except OSError as exc:
            log.warning("could not probe %s: %s", ip, exc)
        self.probed_at[ip] = time.monotonic()
        log.debug("probing idle %s at %s", ip, mac_str(binding.mac))

    def age_vm_macs(self, now_ns: int) -> None:
        bound = set(self.known.values())
        age_ns = self.settings.age * 1e9
        for key, seen in self.maps.vm_macs.items():
            if mac_str(key.addr) not in bound and now_ns - seen.last_seen_ns >= age_ns:
                self.maps.vm_macs.delete(key)

    def sync_lan_fdb(self, now_ns: int) -> None:
        age_ns = self.settings.age * 1e9
        live = set()
        for key, seen in self.maps.lan_macs.items():
            if not seen.flags & constants.LAN_PINNED and now_ns - seen.last_seen_ns >= age_ns:
                self.maps.lan_macs.delete(key)
            else:
                live.add(mac_str(key.addr))
        port = self.attachment.uplink.index
        for mac in live - self.lan_fdb:
            netlink.fdb_set(self.ipr, port, mac)
        for mac in self.lan_fdb - live:
            netlink.fdb_del(self.ipr, port, mac)
        self.lan_fdb = live

    # ---- lifecycle ------------------------------------------------------------------------
    def run(self) -> None:
        """Manage (after start()) until SIGTERM or SIGINT, then detach."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        stopping = []
        previous = {sig: signal.signal(sig, lambda *_: stopping.append(True)) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        watcher = netlink.Watcher()
        try:
            log.info("managing %s <-> %s (uplink %s); ageing after %.0f s", self.attachment.wifi.name,
                     self.attachment.bridge.name, self.attachment.uplink.name, self.settings.age)
            while not stopping:
                if watcher.wait(self.settings.tick, wake_fd=wake_r):
                    self.sync_host_addresses()
                    self.follow_wifi_mac()
                    self.release_gone_ports()
                if stopping:
                    break
                try:
                    self.sweep()
                except Exception:
                    log.exception("sweep failed; the datapath keeps forwarding")
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            watcher.close()
            os.close(wake_r)
            os.close(wake_w)
        self.detach()

    def detach(self) -> None:
        self.attachment.detach()
        self.close()
        log.info("detached from %s", self.attachment.wifi.name)

    def close(self) -> None:
        self.probe_socket.close()
        self.ipr.close()
        self.attachment.close()


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s macnat: %(message)s", datefmt="%H:%M:%S")


def exec_manager(wifi: str, settings: Settings, lock: attachment.ManagerLock, fresh: bool, verbose: bool) -> None:
    """Replace this process (same PID, lock inherited) with a lean manager: the CLI's libraries and
    the compiler that loaded the datapath do not stay resident for the life of the attachment."""
    os.set_inheritable(lock.fd, True)
    sys.stderr.flush()
    handover = {"wifi": wifi, "lock_fd": lock.fd, "fresh": fresh, "verbose": verbose, "settings": asdict(settings)}
    os.execv(sys.executable, [sys.executable, "-m", "macnat.manager", json.dumps(handover)])


def main(handover: dict) -> None:
    setup_logging(handover["verbose"])
    with IPRoute() as ipr:
        found = attachment.require(ipr, handover["wifi"])
    lock = attachment.ManagerLock(found.wifi, fd=handover["lock_fd"])
    try:
        manager = Manager(found, Settings(**handover["settings"]))
        try:
            manager.start()
        except BaseException:
            if handover["fresh"]:  # leave nothing half-done: what this attach created goes again
                manager.detach()
            raise
        manager.run()
    finally:
        lock.release()


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except MacnatError as exc:
        print(f"macnat: error: {exc}", file=sys.stderr)
        sys.exit(1)
