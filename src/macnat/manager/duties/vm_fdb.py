"""Each VM MAC in the bridge's FDB, static and sticky, on the port the datapath saw it on.

The datapath drops a VM's frame with another's source MAC (a VM's, the host's, the gateway's) at
the uplink, but the bridge has learned from it by then, and learning moves even a static entry:
only a sticky one stays, so the MAC's traffic keeps going to its own port, not to the impostor's.
An entry goes when its MAC leaves vm_macs (a port's entries go with the port). vm_macs is read only
when the datapath learned a MAC or the manager released some.
"""

from __future__ import annotations

import logging

from pyroute2.netlink.exceptions import NetlinkError

from macnat import netlink
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.maps import VmMac, mac_str

log = logging.getLogger("macnat")


class VmFdb(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.installed: dict[str, int] = {}   # mac -> port
        self.learned: int | None = None

    def handle(self, event, state) -> None:
        if isinstance(event, (events.PortsReleased, events.NetworkChanged, events.BridgeLost, events.UplinkReady)):
            self.learned = None  # look again at the next tick
        elif isinstance(event, events.Stopping):  # detaching leaves nothing, on the VMs' ports neither
            for mac, port in self.installed.items():
                netlink.fdb_del(state.ipr, port, mac)
            self.installed = {}

    def run(self, now: float, state) -> None:
        learned = state.maps.counter_total("learned_mac")
        if learned == self.learned:
            return
        self.learned = learned
        table = state.maps.vm_macs.snapshot()
        wanted = {mac_str(key): port for key, port in zip(table.key_list(), table.field("port", VmMac)) if port}
        for mac, port in list(wanted.items()):
            if self.installed.get(mac) != port:
                try:
                    netlink.fdb_set(state.ipr, port, mac)
                except NetlinkError as exc:  # the port went away meanwhile
                    log.debug("no FDB entry for %s on port %d: %s", mac, port, exc)
                    del wanted[mac]
        for mac, port in self.installed.items():
            if wanted.get(mac) != port:
                netlink.fdb_del(state.ipr, port, mac)
        self.installed = wanted
