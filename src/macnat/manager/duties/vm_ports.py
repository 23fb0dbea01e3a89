"""A VM MAC belongs to the bridge port it was first seen on (port security, in the datapath); a port
that goes away releases its MACs, their bindings, its DHCP requests and its per-port state, so a VM
that comes back on a new port (a restarted VM gets a new tap) is itself again at once. Static
bindings stay: their MACs are free for the next port to take (the statics duty re-installs them).

Bindings go before MACs, so no frame finds a binding whose MAC is gone; port_released goes before
ports, so a port's usage never reads an old release against fresh counts.
"""

from __future__ import annotations

from macnat import constants, netlink
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Duty
from macnat.maps import Binding, IpAddr, MacAddr, VmMac, mac_str, u32


def release_gone_ports(maps, present: set[int]) -> dict[int, list[str]]:
    """Release what ports not in `present` had; the MACs each released port had."""
    gone = {key.value for key in maps.ports.keys() if key.value and key.value not in present}
    vm_macs = maps.vm_macs.snapshot()
    vm_ports = vm_macs.field("port", VmMac)
    gone |= {port for port in vm_ports if port and port not in present}
    if not gone:
        return {}
    table = maps.bindings.snapshot()
    for i, (port, flags) in enumerate(zip(table.field("port", Binding), table.field("flags", Binding))):
        if port in gone and not flags & constants.BINDING_STATIC:
            maps.bindings.delete(IpAddr.from_buffer_copy(table.key(i)))
    released: dict[int, list[str]] = {port: [] for port in gone}
    for key, port in zip(vm_macs.key_list(), vm_ports):
        if port in gone:
            maps.vm_macs.delete(MacAddr.from_buffer_copy(key))
            released[port].append(mac_str(key))
    for key, request in maps.dhcp_requests.items():
        if request.port in gone:
            maps.dhcp_requests.delete(key)
    for port in gone:
        maps.port_released.delete(u32(port))
        maps.ports.delete(u32(port))
    return released


class VmPorts(Duty):
    def __init__(self):
        self.names: dict[int, str] = {}   # a port's name, still known once it is gone

    def handle(self, event_, state) -> None:
        if isinstance(event_, (events.Started, events.Overrun, events.UplinkReady)) or (
                isinstance(event_, events.LinkChanged) and (event_.link.index in self.names or event_.removed)):
            self.release(state)

    def release(self, state) -> None:
        if state.bridge is None:
            return  # while the bridge is away its ports are too: nothing to tell from that
        present = {p.index: p.name for p in netlink.bridge_ports(state.ipr, state.bridge.index)}
        self.names.update(present)
        released = release_gone_ports(state.maps, set(present))
        for port, macs in released.items():
            name = self.names.pop(port, f"port {port}")
            event("port_released", f"{name} is gone: released its MACs {', '.join(macs) or '(none)'}",
                  port=name, macs=macs)
        if released:
            state.post(events.PortsReleased(released))
