"""Static bindings from the settings: installed at start, changed on reload, never aged or taken over."""

from __future__ import annotations

import logging

from macnat import constants
from macnat.clock import monotonic_ns
from macnat.manager import events
from macnat.manager.duties import Duty
from macnat.maps import Binding, MacAddr, ip_key, mac_bytes, mac_str

log = logging.getLogger("macnat")


class Statics(Duty):
    def handle(self, event, state) -> None:
        if isinstance(event, (events.Started, events.PortsReleased)):
            self.install(state, state.settings.statics, quiet=isinstance(event, events.PortsReleased))
        elif isinstance(event, events.Reloaded) and event.old.statics != event.new.statics:
            removed = {ip: mac for ip, mac in event.old.statics.items() if event.new.statics.get(ip) != mac}
            self.remove(state, removed)
            self.install(state, {ip: mac for ip, mac in event.new.statics.items() if event.old.statics.get(ip) != mac})

    @staticmethod
    def install(state, statics: dict[str, str], quiet: bool = False) -> None:
        """The bindings, and their VMs' MACs for the first bridge port that uses them (a MAC that a port
        already has stays that port's; an installed static binding keeps its counters)."""
        now = monotonic_ns()
        for ip, mac in statics.items():
            if ip in state.host_addresses:
                log.warning("static binding %s refused: it is an address of this host (%s)", ip,
                            state.host_addresses[ip])
                continue
            if state.maps.vm_macs.lookup(MacAddr(mac_bytes(mac))) is None:
                state.maps.add_vm_mac(mac_bytes(mac), last_seen_ns=now)
            current = state.maps.bindings.lookup(ip_key(ip))
            if current is not None and current.flags & constants.BINDING_STATIC and mac_str(current.mac) == mac:
                continue
            state.maps.bindings.update(ip_key(ip), Binding(mac=mac_bytes(mac), flags=constants.BINDING_STATIC,
                                                           last_seen_ns=now))
            if not quiet:
                log.info("static binding %s at %s", ip, mac)

    @staticmethod
    def remove(state, statics: dict[str, str]) -> None:
        for ip in statics:
            binding = state.maps.bindings.lookup(ip_key(ip))
            if binding is not None and binding.flags & constants.BINDING_STATIC:
                state.maps.bindings.delete(ip_key(ip))
                log.info("static binding %s removed", ip)
