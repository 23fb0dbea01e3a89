"""What the VMs may claim on the LAN side, kept current from the host's view of the Wi-Fi network:

- the on-link prefixes (the Wi-Fi's addresses and its gateway-less routes) into the onlink trie, so
  a VM's address must be on the LAN (a family without a known prefix accepts any plausible unicast;
  link-local prefixes do not count, those addresses are on-link by definition);
- the gateways (the host's default routes through the Wi-Fi) pinned in lan_addrs and, once the host
  has resolved them, their MACs in lan_macs: no VM can claim either and no flood evicts them; a VM
  already holding one loses it; a gateway that no longer is one ages like any LAN address;
- LAN addresses the datapath noted (from the LAN's ARP and NDP) age out after `age` unless pinned,
  so a VM may take an address a LAN host gave up.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from macnat import constants, netlink, plumbing
from macnat.clock import monotonic_ns
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Duty
from macnat.maps import (IPV4_MAPPED_PREFIX, Binding, IpAddr, LanAddr, LanMac, MacAddr, OnlinkKey, OnlinkPrefix,
                         ip_key, ip_str, mac_bytes, mac_str)

log = logging.getLogger("macnat")


def onlink_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> OnlinkKey:
    """An on-link prefix as the onlink trie keys it: IPv4 mapped into IPv6, so a /24 is a /120."""
    if network.version == 4:
        return OnlinkKey(prefixlen=96 + network.prefixlen, addr=ip_key(str(network.network_address)))
    return OnlinkKey(prefixlen=network.prefixlen, addr=IpAddr.from_buffer_copy(network.network_address.packed))


def sync_onlink_prefixes(maps, prefixes: set) -> bool:
    """The onlink trie and its per-family flags (CFG_ONLINK_IPV4/IPV6) as `prefixes` say: prefixes
    added before a family's flag is set and removed after it is cleared. Whether anything changed."""
    wanted = {(k.prefixlen, bytes(k.addr)): k for k in (onlink_key(n) for n in prefixes if not n.is_link_local)}
    current = {(k.prefixlen, bytes(k.addr)): k for k in maps.onlink.keys()}
    flags = 0
    for prefixlen, addr in wanted:
        flags |= constants.CFG_ONLINK_IPV4 if addr[:12] == IPV4_MAPPED_PREFIX and prefixlen >= 96 \
            else constants.CFG_ONLINK_IPV6
    for key in wanted.keys() - current.keys():
        maps.onlink.update(wanted[key], OnlinkPrefix(prefixlen=key[0]))
    families = constants.CFG_ONLINK_IPV4 | constants.CFG_ONLINK_IPV6
    config = maps.current_config()
    changed = (config.flags & families) != flags or wanted.keys() != current.keys()
    if config.flags & families != flags:
        plumbing.update_config(maps, flags=(config.flags & ~families) | flags)
    for key in current.keys() - wanted.keys():
        maps.onlink.delete(current[key])
    return changed


def age_lan_addresses(maps, now_ns: int, age_ns: float) -> None:
    """LAN addresses not seen for `age_ns` go (a VM may then claim them); pinned ones stay."""
    table = maps.lan_addrs.snapshot()
    for i, (seen, flags) in enumerate(zip(table.field("last_seen_ns", LanAddr), table.field("flags", LanAddr))):
        if not flags & constants.LAN_PINNED and now_ns - seen >= age_ns:
            maps.lan_addrs.delete(IpAddr.from_buffer_copy(table.key(i)))


def pin_gateway(maps, ip: str, mac: str | None, now_ns: int) -> list[str]:
    """Pin a gateway's address (and its MAC, once known) on the LAN side, taking them from a VM that
    has them; the addresses whose bindings went."""
    removed = []
    key = ip_key(ip)
    binding = maps.bindings.lookup(key)
    if binding is not None and not binding.flags & constants.BINDING_STATIC:
        maps.bindings.delete(key)
        removed.append(ip)
        event("gateway_taken_back", f"{ip} is the LAN's gateway: removed its binding to VM {mac_str(binding.mac)}",
              level=logging.WARNING, ip=ip, mac=mac_str(binding.mac))
    maps.lan_addrs.update(key, LanAddr(last_seen_ns=now_ns, mac=mac_bytes(mac or "00:00:00:00:00:00"),
                                       flags=constants.LAN_PINNED))
    if not mac:
        return removed
    mac_key = MacAddr(mac_bytes(mac))
    if maps.vm_macs.lookup(mac_key) is not None:
        table = maps.bindings.snapshot()
        for i, bound in enumerate(table.field("mac", Binding)):
            if bound == bytes(mac_key.addr):
                address = IpAddr.from_buffer_copy(table.key(i))
                maps.bindings.delete(address)
                removed.append(ip_str(address))
        maps.vm_macs.delete(mac_key)
        event("gateway_taken_back", f"{mac} is the MAC of the LAN's gateway {ip}: it is no VM's any more",
              level=logging.WARNING, ip=ip, mac=mac)
    maps.lan_macs.update(mac_key, LanMac(last_seen_ns=now_ns, flags=constants.LAN_PINNED))
    return removed


class LanSide(Duty):
    """Follows the host's addresses, routes and neighbours by their events; its timer only ages."""

    def __init__(self):
        self.pinned: dict[str, str | None] = {}   # gateway -> its MAC, as last pinned
        self.next_ageing = time.monotonic()

    def handle(self, event_, state) -> None:
        if isinstance(event_, events.NetworkChanged):
            self.pinned = {}  # the old network's pins went with its tables
        wifi_index = state.wifi.index if state.wifi else None
        if isinstance(event_, (events.Started, events.WifiAttached, events.RouteChanged, events.Overrun,
                               events.NetworkChanged)) or (
                isinstance(event_, events.AddressChanged) and event_.index == wifi_index) or (
                isinstance(event_, events.NeighbourChanged) and event_.index == wifi_index
                and event_.address in self.pinned):
            self.follow(state)

    def due(self) -> float:
        return self.next_ageing

    def on_timer(self, now: float, state) -> None:
        self.next_ageing = now + max(1.0, state.settings.age / 10)
        age_lan_addresses(state.maps, monotonic_ns(), state.settings.age * 1e9)

    def follow(self, state) -> None:
        if state.wifi is None:
            return
        prefixes = netlink.onlink_prefixes(state.ipr, state.wifi.index)
        if sync_onlink_prefixes(state.maps, prefixes):
            log.info("on-link prefixes of %s: %s", state.wifi_name,
                     ", ".join(sorted(str(n) for n in prefixes if not n.is_link_local)) or "none known")
        self.pin(state, netlink.gateways(state.ipr, state.wifi.index))

    def pin(self, state, gateways: dict[str, str | None]) -> None:
        if gateways == self.pinned:
            return
        removed = []
        for ip, mac in gateways.items():
            removed += pin_gateway(state.maps, ip, mac, monotonic_ns())
        for ip, mac in self.pinned.items():
            if ip not in gateways:
                self.unpin(state.maps.lan_addrs, ip_key(ip))
            if mac and mac not in gateways.values():
                self.unpin(state.maps.lan_macs, MacAddr(mac_bytes(mac)))
        self.pinned = dict(gateways)
        state.post(events.GatewaysPinned(dict(gateways)))
        if removed:
            state.post(events.BindingsRemoved(tuple(removed)))

    @staticmethod
    def unpin(table, key) -> None:
        value = table.lookup(key)
        if value is not None and value.flags & constants.LAN_PINNED:
            value.flags &= ~constants.LAN_PINNED
            table.update(key, value)



