"""Installs the LAN MACs that talk to VMs as static FDB entries on the uplink port.

The bridge never learns LAN MACs on the uplink (frames from Wi-Fi are redirected into its transmit
path), so without these entries it would flood every VM frame for the gateway to every VM port. The
entries go with the port when it leaves the bridge: UplinkReady puts them all back.
"""

from __future__ import annotations

from macnat import netlink
from macnat.manager import events
from macnat.manager.clock import monotonic_ns
from macnat.manager.duties import Periodic
from macnat import constants
from macnat.maps import LanMac, MacAddr, mac_bytes, mac_str


class LanFdb(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.installed: set[bytes] = set()   # LAN MACs with an FDB entry on the uplink

    def handle(self, event, state) -> None:
        if isinstance(event, events.Started) and state.uplink:
            wifi_mac = mac_str(state.maps.current_config().wifi_mac)
            self.installed = {bytes(mac_bytes(m)) for m in netlink.fdb_static_macs(state.ipr, state.uplink.index) - {wifi_mac}}
        elif isinstance(event, events.UplinkReady):
            for mac in self.installed:
                netlink.fdb_set(state.ipr, event.uplink.index, mac_str(mac))
        elif isinstance(event, events.NetworkChanged) and state.uplink:
            for mac in self.installed:
                netlink.fdb_del(state.ipr, state.uplink.index, mac_str(mac))
            self.installed = set()

    def run(self, now: float, state) -> None:
        if state.uplink is None:
            return
        age_ns = state.settings.age * 1e9
        now_ns = monotonic_ns()
        table = state.maps.lan_macs.snapshot()
        live = set()
        for key, seen, flags in zip(table.key_list(), table.field("last_seen_ns", LanMac), table.field("flags", LanMac)):
            if not flags & constants.LAN_PINNED and now_ns - seen >= age_ns:  # the gateways are pinned
                state.maps.lan_macs.delete(MacAddr.from_buffer_copy(key))
            else:
                live.add(key)
        port = state.uplink.index
        for mac in live - self.installed:
            netlink.fdb_set(state.ipr, port, mac_str(mac))
        for mac in self.installed - live:
            netlink.fdb_del(state.ipr, port, mac_str(mac))
        self.installed = live
        state.lan_macs = len(live)
