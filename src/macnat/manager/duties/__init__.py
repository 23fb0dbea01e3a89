"""The manager's duties: each keeps one thing right, in its own module.

A duty reacts to events (handle) and to its own timer (due/on_timer); it never calls another duty.
What it did that others must know it posts as an event (State.post). Each is tested alone by feeding
it events.
"""

from __future__ import annotations

import time


class Duty:
    """One thing the manager keeps right. Subclasses override what they need."""

    def handle(self, event, state) -> None:
        """React to one event."""

    def due(self) -> float | None:
        """time.monotonic() at which on_timer wants to run next; None for no timer."""
        return None

    def on_timer(self, now: float, state) -> None:
        """Periodic work, run once due() has passed."""

    def close(self) -> None:
        """Release what the duty holds (sockets, child processes)."""


class Periodic(Duty):
    """A duty whose work runs every `interval` seconds (the interval may depend on the settings)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.next_at = time.monotonic()

    def due(self) -> float | None:
        return self.next_at

    def on_timer(self, now: float, state) -> None:
        self.next_at = now + self.interval
        self.run(now, state)

    def run(self, now: float, state) -> None:
        raise NotImplementedError


def all_duties() -> list[Duty]:
    """Every duty, in the order each event reaches them (the plumbing first: the others need its links)."""
    from macnat.manager.duties import (ageing, bindings_log, claims, dhcp_policy, docking, host_addresses, lan_fdb,
                                       lan_side, metrics, network_change, notify, plumbing, port_accounting,
                                       security_log, security_settings, statics, status_file, vm_fdb, vm_ports,
                                       wifi_identity)

    return [
        plumbing.Plumbing(),
        docking.Docking(),
        security_settings.SecuritySettings(),
        host_addresses.HostAddresses(),
        lan_side.LanSide(),
        vm_ports.VmPorts(),
        bindings_log.BindingsLog(),   # before the statics: it reads what an earlier manager left
        statics.Statics(),
        wifi_identity.WifiIdentity(),
        network_change.NetworkChange(),
        dhcp_policy.DhcpPolicy(),
        lan_fdb.LanFdb(),
        vm_fdb.VmFdb(),
        ageing.Ageing(),
        claims.Claims(),
        port_accounting.PortAccounting(),
        security_log.SecurityLog(),
        status_file.StatusFile(),
        metrics.Metrics(),
        notify.Notify(),
    ]
