"""Logs what the datapath refused: VM frames claiming an address of the host or another VM's static one.

The datapath records each refusal (address, VM, reason, count); this duty logs a line when a record's
count moved since the last line for it, at most once a second for all of them.
"""

from __future__ import annotations

import logging

from macnat import constants
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.maps import ip_str, mac_str

REFUSAL_COUNTERS = ("refused_host_ip", "refused_static")


class Refusals(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.reported: dict[str, int] | None = None   # address -> refusal count as last logged
        self.counts: tuple[int, ...] | None = None

    def handle(self, event_, state) -> None:
        if isinstance(event_, events.NetworkChanged):
            self.reported = {}

    def run(self, now: float, state) -> None:
        counts = tuple(state.maps.counter_total(name) for name in REFUSAL_COUNTERS)
        if counts == self.counts:
            return
        self.counts = counts
        first = self.reported is None  # at start, what an earlier manager saw is not news
        reported = self.reported or {}
        for key, refusal in state.maps.refusals.items():
            ip = ip_str(key)
            if refusal.count == reported.get(ip):
                continue
            reported[ip] = refusal.count
            if first:
                continue
            if refusal.reason == constants.COUNTER_INDEX["refused_host_ip"]:
                why = f"an address of this host ({state.host_addresses.get(ip, '?')})"
            else:
                why = "statically bound to another VM"
            event("refused", f"refused: VM {mac_str(refusal.mac)} claims {ip}, {why} ({refusal.count} frames dropped)",
                  level=logging.WARNING, ip=ip, mac=mac_str(refusal.mac), reason=why, frames=refusal.count)
        self.reported = reported
