"""Installs the LAN MACs that talk to VMs as static FDB entries on the uplink port.

The bridge never learns LAN MACs on the uplink (frames from Wi-Fi are redirected into its transmit
path), so without these entries it would flood every VM frame for the gateway to every VM port. The
entries go with the port when it leaves the bridge: UplinkReady puts them all back.

The table is read when the datapath counted a new LAN MAC (learned_lan_mac), or to age it (every
tenth of `age`): an idle laptop's manager does not scan it every second.
"""

from __future__ import annotations

from macnat import netlink
from macnat import constants
from macnat.clock import monotonic_ns
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.maps import LanMac, MacAddr, mac_bytes, mac_str


class LanFdb(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.installed: set[bytes] = set()   # LAN MACs with an FDB entry on the uplink
        self.learned: int | None = None       # learned_lan_mac when the table was last read
        self.next_ageing = 0.0

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
        if isinstance(event, (events.GatewaysPinned, events.NetworkChanged)):
            self.learned = None  # the manager's own entries (the gateways' MACs) are not counted

    def run(self, now: float, state) -> None:
        if state.uplink is None:
            return
        learned = state.maps.counter_total("learned_lan_mac")
        if learned == self.learned and now < self.next_ageing:
            return
        self.learned = learned
        self.next_ageing = now + max(1.0, state.settings.age / 10)
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
