"""Ages what the datapath learned: idle bindings are probed, then removed; unbound VM MACs go too.

An idle binding is asked with a **unicast** ARP request or neighbour solicitation from the Wi-Fi
interface (power-saving clients ignore broadcast probes); the VM's answer refreshes the binding in
the datapath. A binding silent for the whole `age` is removed. Static bindings never age. While the
Wi-Fi interface is away, down or not associated the VMs cannot reach the LAN (and the host may have no
address to probe from), so nothing expires then, and for one `age` after it is back only probes go
out: every VM gets the time to answer.
"""

from __future__ import annotations

import logging
import socket
import time

from macnat import constants, frames, netlink
from macnat.logs import event
from macnat.manager import events
from macnat.manager.clock import monotonic_ns
from macnat.tables import binding_counts
from macnat.manager.duties import Periodic
from macnat.maps import Binding, IpAddr, MacAddr, MacSeen, ip_str, mac_str

log = logging.getLogger("macnat")
PROBES = 3   # unicast probes an idle binding gets before it expires


class Ageing(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.probed_at: dict[str, float] = {}   # address -> time.monotonic() of its last probe
        self.grace_until = 0.0
        self.wifi_was_unusable = False
        self.socket: socket.socket | None = None
        self.socket_bridge: int | None = None

    def handle(self, event_, state) -> None:
        if isinstance(event_, (events.Started, events.Reloaded)):
            self.interval = self.probe_interval(state)
            self.next_at = time.monotonic()  # the age may have changed: judge every binding again

    @staticmethod
    def probe_interval(state) -> float:
        return max(1.0, state.settings.age / 10)

    def run(self, now: float, state) -> None:
        if state.wifi is None or not (state.wifi.up and state.wifi.carrier):
            self.wifi_was_unusable = True
            return  # nothing can refresh a binding meanwhile: keep them all
        if self.wifi_was_unusable:
            self.wifi_was_unusable = False
            self.grace_until = now + state.settings.age
        expire = now >= self.grace_until
        now_ns = monotonic_ns()
        age_ns = int(state.settings.age * 1e9)
        probe_from_ns = age_ns - int(PROBES * self.interval * 1e9)
        table = state.maps.bindings.snapshot()
        flags, seen = table.field("flags", Binding), table.field("last_seen_ns", Binding)
        macs = table.field("mac", Binding)
        learned = [i for i, f in enumerate(flags) if not f & constants.BINDING_STATIC]
        idle = {i: ip_str(IpAddr.from_buffer_copy(table.key(i))) for i in learned if now_ns - seen[i] >= probe_from_ns}
        source = None  # read once a sweep, when a probe is due
        expired: dict[int, str] = {}
        for i, ip in idle.items():
            idle_ns = now_ns - seen[i]
            if expire and idle_ns >= age_ns:
                state.maps.bindings.delete(IpAddr.from_buffer_copy(table.key(i)))
                expired[i] = ip
                event("expired", f"expired {ip} at {mac_str(macs[i])}: silent for {idle_ns / 1e9:.0f} s",
                      ip=ip, mac=mac_str(macs[i]), idle_s=round(idle_ns / 1e9))
            elif self.probe_due(ip, now):
                source = source or self.probe_source(state)
                self.probe(state, ip, macs[i], source, now)
        waiting = set(idle.values()) - set(expired.values())   # probed and not answered yet
        self.probed_at = {ip: t for ip, t in self.probed_at.items() if ip in waiting}
        bound = {macs[i] for i in range(table.count) if i not in expired}
        state.bindings, state.vms = table.count - len(expired), len(bound)
        state.binding_counts = binding_counts(table)
        if expired:
            state.post(events.BindingsExpired(tuple(expired.values())))
        if expire:
            vm_macs = state.maps.vm_macs.snapshot()
            for key, last in zip(vm_macs.key_list(), vm_macs.field("last_seen_ns", MacSeen)):
                if key not in bound and now_ns - last >= age_ns:
                    state.maps.vm_macs.delete(MacAddr.from_buffer_copy(key))
        if learned and not idle:
            # Nothing can become idle before its last sighting allows: no sweep until the first one may.
            first_idle_ns = min(seen[i] for i in learned) + probe_from_ns
            self.next_at = max(self.next_at, now + (first_idle_ns - now_ns) / 1e9)

    def probe_due(self, ip: str, now: float) -> bool:
        last = self.probed_at.get(ip)
        return last is None or now - last >= self.interval

    @staticmethod
    def probe_source(state) -> tuple[bytes, bytes, bytes | None]:
        """What a probe comes from: the Wi-Fi interface's MAC, IPv4 (0.0.0.0 if none), IPv6 link-local."""
        index = state.wifi.index
        ipv4 = netlink.interface_address(state.ipr, index, socket.AF_INET) or "0.0.0.0"
        ipv6 = netlink.interface_address(state.ipr, index, socket.AF_INET6, link_local=True)
        return (bytes(state.maps.current_config().wifi_mac), socket.inet_aton(ipv4),
                socket.inet_pton(socket.AF_INET6, ipv6) if ipv6 else None)

    def probe(self, state, ip: str, vm_mac: bytes, source, now: float) -> None:
        """Ask an idle VM whether it still has `ip`: its answer refreshes the binding in the datapath."""
        mac, ipv4, ipv6 = source
        if ":" in ip:
            if ipv6 is None:
                log.debug("cannot probe %s: %s has no IPv6 link-local address", ip, state.wifi_name)
                return
            frame = frames.neighbour_solicitation(vm_mac, mac, ipv6, socket.inet_pton(socket.AF_INET6, ip))
        else:
            frame = frames.arp(vm_mac, mac, ipv4, socket.inet_aton(ip))
        try:
            self.bridge_socket(state).send(frame)
        except OSError as exc:
            log.warning("could not probe %s: %s", ip, exc)
        self.probed_at[ip] = now
        log.debug("probing idle %s at %s", ip, mac_str(vm_mac))

    def bridge_socket(self, state) -> socket.socket:
        """A packet socket into the bridge (opened again when the bridge is re-created)."""
        if state.bridge is None:
            raise OSError(f"{state.settings.bridge} is gone")
        if self.socket is None or self.socket_bridge != state.bridge.index:
            self.close()
            self.socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.socket.bind((state.bridge.name, 0))
            self.socket_bridge = state.bridge.index
        return self.socket

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
