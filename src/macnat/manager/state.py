"""The facts the duties share: one small object the loop hands to every duty with every event."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from macnat.config import Resolved, Settings
from macnat.datapath import Datapath
from macnat.maps import Maps
from macnat.netlink import Link


@dataclass
class Association:
    """The Wi-Fi network the station is associated with, as nl80211 reports it."""

    ssid: str | None = None
    bssid: str | None = None
    frequency: int | None = None

    def describe(self) -> str:
        if not self.ssid and not self.bssid:
            return "not associated"
        freq = f", {self.frequency} MHz" if self.frequency else ""
        return f"'{self.ssid}' ({self.bssid}{freq})"


@dataclass
class State:
    wifi_name: str
    resolved: Resolved
    datapath: Datapath
    ipr: IPRoute
    lock: object | None = None      # the ManagerLock this manager holds (its status file is beside it)
    wifi: Link | None = None        # the Wi-Fi interface macnat's programs are on, None while it is away
    bridge: Link | None = None
    uplink: Link | None = None
    association: Association = field(default_factory=Association)
    network: object | None = None   # the current network (macnat.manager.duties.network_change.Network)
    host_addresses: dict[str, str] = field(default_factory=dict)  # this host's addresses -> interface
    stepped_aside: str | None = None  # the bridge's wired uplinks while macnat steps aside for them
    dhcp: str = "keep"              # the DHCPv4 policy as it acts now ("keep", "auto: rewrite since ...")
    bindings: int = 0               # table sizes as of the last sweep, for status lines and metrics
    vms: int = 0
    binding_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (family, kind) -> bindings
    lan_macs: int = 0
    # bridge port -> {"mac", "owner", "at"}: the last frame refused there for another's source MAC (a
    # forging VM, or a second way to the LAN when the MAC is a LAN host's); for doctor, via the status file
    forged_sources: dict[str, dict] = field(default_factory=dict)
    started_monotonic: float = field(default_factory=time.monotonic)
    stopping: bool = False
    exit_code: int = 0
    posted: deque = field(default_factory=deque)

    @property
    def settings(self) -> Settings:
        return self.resolved.settings

    @property
    def maps(self) -> Maps:
        return self.datapath.maps

    @property
    def attached(self) -> bool:
        """Whether the datapath forwards: on the Wi-Fi interface, with the uplink in the bridge."""
        return (self.wifi is not None and self.bridge is not None and self.uplink is not None
                and self.uplink.master == self.bridge.index)

    @property
    def phase(self) -> str:
        if self.wifi is None:
            return f"waiting for {self.wifi_name}"
        if self.bridge is None:
            return f"waiting for {self.settings.bridge}"
        if self.stepped_aside:
            return f"stepped aside for {self.stepped_aside}"
        if not self.attached:
            return "repairing the uplink"
        return "attached"

    def summary(self) -> str:
        """One line of what the manager is doing: "3 VMs, 5 bindings on 'HomeWifi'" / "waiting for wlan0"."""
        if self.phase != "attached":
            return self.phase
        where = self.association.ssid and f"'{self.association.ssid}'"
        where = where or (self.network.describe() if self.network else self.wifi_name)
        return f"{self.vms} VM{'s' if self.vms != 1 else ''}, {self.bindings} binding{'s' if self.bindings != 1 else ''} on {where}"

    def post(self, event) -> None:
        """Hand a derived event to every duty, after the current one is done."""
        self.posted.append(event)
