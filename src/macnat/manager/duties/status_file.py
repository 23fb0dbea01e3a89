"""Keeps /run/macnat/<netns>-<wifi>.json current: what `macnat status`, `table` and `stats` read about
the running manager (its state, network and the programs it holds, also while the Wi-Fi is away)."""

from __future__ import annotations

import time

from macnat.manager.duties import Periodic
from macnat.maps import mac_str

REFRESH = 5.0   # the counts change without events


class StatusFile(Periodic):
    def __init__(self):
        super().__init__(interval=REFRESH)
        self.program_ids: dict[str, int] | None = None
        self.last: dict | None = None

    def handle(self, event, state) -> None:
        self.write(state)   # every event may change the state, the network or the links

    def run(self, now: float, state) -> None:
        self.write(state)

    def write(self, state) -> None:
        if state.lock is None:
            return
        if self.program_ids is None:
            self.program_ids = state.datapath.program_ids()
        network = state.network
        status = {
            "state": state.phase, "summary": state.summary(), "wifi": state.wifi_name,
            "wifi_mac": mac_str(state.maps.current_config().wifi_mac),
            "bridge": state.settings.bridge, "uplink": state.uplink.name if state.uplink else None,
            "program_ids": self.program_ids,
            "network": network.describe() if network else None,
            "ssid": state.association.ssid, "bssid": state.association.bssid,
            "bindings": state.bindings, "vms": state.vms, "forged_sources": state.forged_sources, "dhcp": state.dhcp,
            "config": str(state.resolved.path), "uptime_s": round(time.monotonic() - state.started_monotonic),
        }
        comparable = {k: v for k, v in status.items() if k != "uptime_s"}
        comparable["forged_sources"] = {port: f["mac"] for port, f in state.forged_sources.items()}
        if comparable != self.last and not state.stopping:
            state.lock.write_status(status)
            self.last = comparable
