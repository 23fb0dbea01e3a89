"""Keeps host_addrs equal to this host's addresses, so no VM can claim one.

The datapath refuses VM frames that claim an address in host_addrs; when the host gains an address a
VM had, that VM's binding goes (the host wins).
"""

from __future__ import annotations

import logging

from macnat import netlink
from macnat.manager import events
from macnat.manager.duties import Duty
from macnat.maps import ip_key, ip_str, mac_str, u8

log = logging.getLogger("macnat")


class HostAddresses(Duty):
    def handle(self, event, state) -> None:
        if isinstance(event, (events.Started, events.AddressChanged, events.WifiAttached, events.Overrun)):
            self.sync(state)

    def sync(self, state) -> None:
        maps = state.maps
        wanted = netlink.host_addresses(state.ipr)
        current = {ip_str(k) for k in maps.host_addrs.keys()}
        for ip in wanted.keys() - current:
            maps.host_addrs.update(ip_key(ip), u8(1))
            binding = maps.bindings.lookup(ip_key(ip))
            if binding is not None:
                maps.bindings.delete(ip_key(ip))
                log.warning("%s is now an address of this host (%s): removed its binding to VM %s",
                            ip, wanted[ip], mac_str(binding.mac))
                state.post(events.BindingsExpired((ip,)))
        for ip in current - wanted.keys():
            maps.host_addrs.delete(ip_key(ip))
        state.host_addresses = wanted
