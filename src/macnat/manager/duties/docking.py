"""Steps aside while the bridge has a wired uplink of its own with a carrier (a laptop docked, its
Ethernet in vmbr0), and takes over again when it goes (undocked, the cable out).

With two ways from the VMs to the same LAN the bridge would make a loop through the access point:
LAN frames entering by the cable would be flooded to macnat's uplink and sent out on Wi-Fi. So while
such a port forwards, macnat's uplink is down and config[0] names no bridge (frames from Wi-Fi go to
the host only): the VMs are on the LAN by the cable. A wired uplink is any bridge port that is not
a VM's (QEMU taps, and veths: containers, Proxmox's firewall bridges, the lab's VMs) and not
macnat's own; a veth leading to the LAN is not recognised (`macnat doctor` reports a second uplink).
"""

from __future__ import annotations

import logging

from macnat import netlink, plumbing
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Duty

log = logging.getLogger("macnat")
VM_PORT_KINDS = ("tun", "veth")


def wired_uplinks(state) -> list[netlink.Link]:
    if state.bridge is None:
        return []
    return [p for p in netlink.bridge_ports(state.ipr, state.bridge.index)
            if p.kind not in VM_PORT_KINDS and p.carrier and (state.uplink is None or p.index != state.uplink.index)]


class Docking(Duty):
    def __init__(self):
        self.ports: set[int] = set()   # bridge ports last seen, whose changes may dock or undock

    def handle(self, event_, state) -> None:
        if isinstance(event_, (events.Started, events.UplinkReady, events.Overrun, events.BridgeLost)) or (
                isinstance(event_, events.LinkChanged) and (event_.link.index in self.ports or (
                    state.bridge is not None and event_.link.master == state.bridge.index))):
            self.judge(state)

    def judge(self, state) -> None:
        wired = wired_uplinks(state)
        self.ports = {p.index for p in netlink.bridge_ports(state.ipr, state.bridge.index)} if state.bridge else set()
        if wired and state.stepped_aside is None and state.uplink is not None:
            names = ", ".join(p.name for p in wired)
            state.ipr.link("set", index=state.uplink.index, state="down")
            plumbing.update_config(state.maps, bridge_ifindex=0)
            state.stepped_aside = names
            event("stepped_aside", f"{state.settings.bridge} has a wired uplink ({names}): macnat steps aside while "
                  "it forwards, the VMs are on the LAN through it", level=logging.WARNING, uplinks=names)
        elif not wired and state.stepped_aside is not None:
            was = state.stepped_aside
            state.stepped_aside = None
            if state.uplink is not None and state.bridge is not None:
                plumbing.update_config(state.maps, bridge_ifindex=state.bridge.index)
                plumbing.set_up(state.ipr, state.uplink)
            event("took_over", f"{state.settings.bridge}'s wired uplink ({was}) is gone or has no carrier: the VMs are on "
                  "the LAN through the Wi-Fi again", uplinks=was)
