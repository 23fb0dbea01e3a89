"""Knows which Wi-Fi network the station is on (SSID, BSSID, frequency) and logs its changes.

nl80211 reports every connect, roam and disconnect; the carrier (IFF_LOWER_UP) says the same more
coarsely where there is no nl80211 (the lab's emulated station).
"""

from __future__ import annotations

import logging

from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Duty
from macnat.manager.state import Association
from macnat.nl80211 import station_network

log = logging.getLogger("macnat")


class WifiIdentity(Duty):
    def __init__(self):
        self.carrier: bool | None = None

    def handle(self, event_, state) -> None:
        if isinstance(event_, (events.Started, events.WifiAttached)) and state.wifi:
            self.carrier = state.wifi.carrier
            self.refresh(state, "on")
        elif isinstance(event_, events.WifiAssociation) and state.wifi and event_.index == state.wifi.index:
            if event_.kind == "disconnect":
                event("disconnected", f"{state.wifi_name} disconnected from {state.association.describe()}",
                      ssid=state.association.ssid, bssid=state.association.bssid)
                state.association = Association()
            else:
                self.refresh(state, "roamed to" if event_.kind == "roam" else "connected to")
        elif isinstance(event_, events.LinkChanged) and state.wifi and event_.link.index == state.wifi.index \
                and not event_.removed and event_.link.carrier != self.carrier:
            self.carrier = event_.link.carrier
            log.info("%s %s", state.wifi_name, "has a carrier again (associated)" if self.carrier
                     else "lost its carrier (not associated, or down)")
        elif isinstance(event_, events.WifiLost):
            state.association = Association()
            self.carrier = None

    @staticmethod
    def refresh(state, verb: str) -> None:
        try:
            found = station_network(state.wifi.index)
        except Exception as exc:  # no nl80211 (not a Wi-Fi device, or no cfg80211 at all)
            log.debug("no nl80211 station information for %s: %s", state.wifi_name, exc)
            return
        state.association = Association(found.get("ssid"), found.get("bssid"), found.get("frequency"))
        if found:
            event("associated", f"{state.wifi_name} {verb} {state.association.describe()}",
                  ssid=state.association.ssid, bssid=state.association.bssid,
                  frequency=state.association.frequency)
