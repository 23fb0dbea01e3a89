"""The manager's half of the per-port limits: what each VM port has released.

The datapath adds to each port's learned counts (ports map) when it learns a MAC, an address or a
DHCP request, and refuses learning once learned - released reaches the port's limit. The manager
never writes a value the datapath updates: it counts what the tables hold for each port (reading
the learned counts first), and writes released = learned - held into port_released. What is learned
during the scan counts twice until the next run, which errs on refusing. Static bindings are the
user's and count for no port. DHCP requests older than their use go here too.

The tables are read only when something could have changed the answer: a learned count moved, the
datapath moved or dropped a binding (moved_ip, dad_conflict), or the manager removed entries.
"""

from __future__ import annotations

import ctypes

from macnat import constants
from macnat.clock import monotonic_ns
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.maps import Binding, DhcpRequest, IPV4_MAPPED_PREFIX, PortCounts, VmMac, u32

INTERVAL = 2.0
DATAPATH_REMOVALS = ("moved_ip", "dad_conflict")
REMOVING_EVENTS = (events.BindingsExpired, events.NetworkChanged, events.PortsReleased, events.BindingsRemoved)


def held_per_port(maps) -> dict[int, dict[str, int]]:
    """What the tables hold, per port and kind (constants.PORT_COUNTS)."""
    held: dict[int, dict[str, int]] = {}

    def add(port: int, kind: str) -> None:
        if port:
            held.setdefault(port, dict.fromkeys(constants.PORT_COUNTS, 0))[kind] += 1

    for port in maps.vm_macs.snapshot().field("port", VmMac):
        add(port, "macs")
    table = maps.bindings.snapshot()
    for key, port, flags in zip(table.key_list(), table.field("port", Binding), table.field("flags", Binding)):
        if not flags & constants.BINDING_STATIC:
            add(port, "ipv4" if key[:12] == IPV4_MAPPED_PREFIX else "ipv6")
    for port in maps.dhcp_requests.snapshot().field("port", DhcpRequest):
        add(port, "dhcp_requests")
    return held


def write_released_counts(maps) -> dict[int, dict[str, int]]:
    """Each port's learned counts are read first, then what the tables hold for the port is counted,
    and released = learned - held is written to port_released. Returns what the tables hold."""
    learned = {key.value: list(value.learned.count) for key, value in maps.ports.items()}
    held = held_per_port(maps)
    for port, counts in learned.items():
        have = held.get(port, dict.fromkeys(constants.PORT_COUNTS, 0))
        released = [(count - have[kind]) % 2**64 for count, kind in zip(counts, constants.PORT_COUNTS)]
        current = maps.port_released.lookup(u32(port))
        if current is None or list(current.count) != released:
            maps.port_released.update(u32(port), PortCounts(
                count=(ctypes.c_uint64 * len(constants.PORT_COUNTS))(*released)))
    return {port: held.get(port, dict.fromkeys(constants.PORT_COUNTS, 0)) for port in learned}


def age_dhcp_requests(maps, now_ns: int) -> None:
    """DHCP requests older than their use (a DHCPACK binds at once only within DHCP_REQUEST_TTL_S) go."""
    for key, request in maps.dhcp_requests.items():
        if now_ns - request.time_ns >= constants.DHCP_REQUEST_TTL_S * 1e9:
            maps.dhcp_requests.delete(key)


class PortAccounting(Periodic):
    def __init__(self):
        super().__init__(interval=INTERVAL)
        self.inputs: tuple | None = None
        self.dirty = True

    def handle(self, event, state) -> None:
        if isinstance(event, (events.Started, *REMOVING_EVENTS)):
            self.dirty = True

    def run(self, now: float, state) -> None:
        maps = state.maps
        learned = {key.value: list(value.learned.count) for key, value in maps.ports.items()}
        inputs = (sorted((p, tuple(c)) for p, c in learned.items()),
                  tuple(maps.counter_total(name) for name in DATAPATH_REMOVALS))
        if inputs == self.inputs and not self.dirty:
            return
        self.inputs, self.dirty = inputs, False
        age_dhcp_requests(maps, monotonic_ns())
        write_released_counts(maps)
