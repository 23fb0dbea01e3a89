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
- logs what was learned, moved, expired and refused.
If the manager dies, the datapath keeps forwarding with what it has, and a new manager adopts it.
"""

from __future__ import annotations

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

from macnat import attachment, constants, netlink
from macnat.attachment import Attachment
from macnat.errors import MacnatError
from macnat.maps import Binding, ip_key, ip_str, mac_bytes, mac_str, u8, u32

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

    @property
    def probe_interval(self) -> float:
        return max(self.tick, self.age / 10)


@dataclass(frozen=True)
class ProbeSource:
    """What an idle VM's probe comes from: wlan0's MAC and addresses."""

    mac: bytes
    ipv4: bytes           # 0.0.0.0 when wlan0 has no IPv4 address
    ipv6: bytes | None    # wlan0's link-local address; no IPv6 probes without one


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns(), which stamps last_seen_ns."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


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

    # ---- start-up -------------------------------------------------------------------------
    def start(self) -> None:
        config = self.maps.current_config()
        self.lan_fdb = netlink.fdb_static_macs(self.ipr, self.attachment.uplink.index) - {mac_str(config.wifi_mac)}
        self.known = {ip_str(k): mac_str(v.mac) for k, v in self.maps.bindings.items()}
        self.refused = {ip_str(k): v.count for k, v in self.maps.refusals.items()}
        if self.known:
            log.info("adopted %d bindings: %s", len(self.known),
                     ", ".join(f"{ip} at {mac}" for ip, mac in sorted(self.known.items())))
        self.sync_host_addresses()
        self.follow_wifi_mac()
        self.install_statics()

    def install_statics(self) -> None:
        now = monotonic_ns()
        for ip, mac in self.settings.statics.items():
            if ip in self.host_addrs:
                log.warning("static binding %s refused: it is an address of this host (%s)", ip, self.host_addrs[ip])
                continue
            self.maps.add_vm_mac(mac_bytes(mac), last_seen_ns=now)
            self.maps.bindings.update(ip_key(ip), Binding(mac=mac_bytes(mac), flags=constants.BINDING_STATIC,
                                                          last_seen_ns=now))
            log.info("static binding %s at %s", ip, mac)

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
        self.report_refusals()

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
            if now_ns - seen.last_seen_ns >= age_ns:
                self.maps.lan_macs.delete(key)
            else:
                live.add(mac_str(key.addr))
        port = self.attachment.uplink.index
        for mac in live - self.lan_fdb:
            netlink.fdb_set(self.ipr, port, mac)
        for mac in self.lan_fdb - live:
            netlink.fdb_del(self.ipr, port, mac)
        self.lan_fdb = live

    def report_refusals(self) -> None:
        for key, refusal in self.maps.refusals.items():
            ip = ip_str(key)
            if refusal.count != self.refused.get(ip):
                self.refused[ip] = refusal.count
                if refusal.reason == constants.COUNTER_INDEX["refused_host_ip"]:
                    why = f"an address of this host ({self.host_addrs.get(ip, '?')})"
                else:
                    why = "statically bound to another VM"
                log.warning("refused: VM %s claims %s, %s (%d frames dropped)",
                            mac_str(refusal.mac), ip, why, refusal.count)

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
