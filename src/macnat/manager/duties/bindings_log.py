"""Logs the bindings the datapath learned or moved.

The datapath learns on its own; its learned_ip/moved_ip counters say when something changed, so the
table is read only then, not every second (a full table is 65,536 elements).
"""

from __future__ import annotations

from macnat import constants
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.maps import ip_str, mac_str

WATCHED_COUNTERS = ("learned_ip", "moved_ip", "dad_conflict")


class BindingsLog(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.known: dict[str, str] | None = None   # address -> MAC as last logged; None until read once
        self.counts: tuple[int, ...] | None = None

    def handle(self, event_, state) -> None:
        if isinstance(event_, events.Started):
            self.run(0.0, state)  # before the statics go in: what is there now was left by an earlier manager
        elif isinstance(event_, events.BindingsExpired) and self.known is not None:
            for ip in event_.addresses:
                self.known.pop(ip, None)
        elif isinstance(event_, events.NetworkChanged):
            self.counts = None  # read again: the table was flushed

    def run(self, now: float, state) -> None:
        counts = tuple(state.maps.counter_total(name) for name in WATCHED_COUNTERS)
        if counts == self.counts:
            return
        self.counts = counts
        table = list(state.maps.bindings.items())
        state.bindings, state.vms = len(table), len({bytes(v.mac) for _, v in table})
        # static bindings are the settings' (the statics duty logs them), not learned
        current = {ip_str(k): mac_str(v.mac) for k, v in table if not v.flags & constants.BINDING_STATIC}
        if self.known is None:  # at start: what an earlier manager left is adopted, not learned
            if current:
                event("adopted", f"adopted {len(current)} bindings: "
                      + ", ".join(f"{ip} at {mac}" for ip, mac in sorted(current.items())), count=len(current))
        else:
            for ip, mac in current.items():
                old = self.known.get(ip)
                if old is None:
                    event("learned", f"learned {ip} at {mac}", ip=ip, mac=mac)
                elif old != mac:
                    event("moved", f"{ip} moved from {old} to {mac}", ip=ip, mac=mac, old_mac=old)
        self.known = current
