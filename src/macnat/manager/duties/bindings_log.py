"""Logs the bindings the datapath learned or moved.

The datapath learns on its own; its learned_ip/moved_ip counters say when something changed, so the
table is read only then, not every second (a full table is 65,536 elements).
"""

from __future__ import annotations

from macnat import constants
from macnat.logs import event
from macnat.manager import events
from macnat.tables import binding_counts
from macnat.manager.duties import Periodic
from macnat.maps import Binding, IpAddr, ip_key, ip_str, mac_str

WATCHED_COUNTERS = ("learned_ip", "moved_ip", "dad_conflict")
ADOPTED_SHOWN = 20   # bindings named in the "adopted" line; a full table would be 65,536


class BindingsLog(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.known: dict[bytes, bytes] | None = None   # key -> MAC as last logged; None until read once
        self.counts: tuple[int, ...] | None = None

    def handle(self, event_, state) -> None:
        if isinstance(event_, events.Started):
            self.run(0.0, state)  # before the statics go in: what is there now was left by an earlier manager
        elif isinstance(event_, events.BindingsExpired) and self.known is not None:
            for ip in event_.addresses:
                self.known.pop(bytes(ip_key(ip)), None)
        elif isinstance(event_, events.NetworkChanged):
            self.counts = None  # read again: the table was flushed

    def run(self, now: float, state) -> None:
        counts = tuple(state.maps.counter_total(name) for name in WATCHED_COUNTERS)
        if counts == self.counts:
            return
        self.counts = counts
        table = state.maps.bindings.snapshot()
        macs, flags = table.field("mac", Binding), table.field("flags", Binding)
        state.bindings, state.vms = table.count, len(set(macs))
        state.binding_counts = binding_counts(table)
        # static bindings are the settings' (the statics duty logs them), not learned
        current = {key: mac for key, mac, f in zip(table.key_list(), macs, flags) if not f & constants.BINDING_STATIC}
        if self.known is None:  # at start: what an earlier manager left is adopted, not learned
            if current:
                listed = sorted((ip_str(IpAddr.from_buffer_copy(k)), mac_str(m)) for k, m in current.items())
                shown = ", ".join(f"{ip} at {mac}" for ip, mac in listed[:ADOPTED_SHOWN])
                more = f" and {len(listed) - ADOPTED_SHOWN} more" if len(listed) > ADOPTED_SHOWN else ""
                event("adopted", f"adopted {len(current)} bindings: {shown}{more}", count=len(current))
        else:
            for key, mac in current.items():
                old = self.known.get(key)
                if old == mac:
                    continue
                ip = ip_str(IpAddr.from_buffer_copy(key))
                if old is None:
                    event("learned", f"learned {ip} at {mac_str(mac)}", ip=ip, mac=mac_str(mac))
                else:
                    event("moved", f"{ip} moved from {mac_str(old)} to {mac_str(mac)}", ip=ip, mac=mac_str(mac),
                          old_mac=mac_str(old))
        self.known = current
