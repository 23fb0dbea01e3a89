"""Log lines from the datapath's events (its ring buffer), rate-limited.

The first event of a kind from an offender (a VM's bridge port, whatever MACs it forges; on the LAN
side, a MAC) is logged at once; the others of the same interval are only counted, and summed up in
one line when LOG_INTERVAL_S is over. What the datapath itself suppressed (its per-port event rate)
is summed up per port. Learning events are left to the bindings log, which reads them from the table.
"""

from __future__ import annotations

import logging
import time

from macnat import netlink
from macnat.clock import monotonic_ns
from macnat.logs import event
from macnat.manager.duties import Periodic
from macnat.maps import ip_str, mac_str

LOG_INTERVAL_S = 10.0
QUIET = {"learned_mac", "learned_ip", "moved_ip"}
WHY_REFUSED = {
    "refused_host_ip": "an address of this host",
    "refused_static": "statically bound to another VM",
    "refused_claim": "bound to another VM (its owner is probed)",
    "refused_lan_ip": "an address the LAN uses",
    "refused_address": "no address a VM may have",
}
MAC_OWNERS = {"refused_mac_port": "another port's", "refused_mac_wifi": "the Wi-Fi interface's",
              "refused_mac_lan": "a LAN host's"}
FORGED_SOURCE_KEEP_S = 600   # how long a port's forged source stays in the status file


class SecurityLog(Periodic):
    def __init__(self, interval_s: float = LOG_INTERVAL_S):
        super().__init__(interval=1.0)
        self.interval_ns = interval_s * 1e9
        self.window: dict[tuple, list] = {}      # offender and kind -> [first_ns, more, first line, fields]
        self.suppressed: dict[int, int] = {}     # port -> its events_suppressed, as last reported
        self.names: dict[int, str] = {}

    def run(self, now: float, state) -> None:
        self.drain(state, monotonic_ns())

    def drain(self, state, now_ns: int) -> None:
        for record in state.maps.events():
            kind = record.kind_name
            if kind in QUIET:
                continue
            if kind in MAC_OWNERS and record.port:
                state.forged_sources[self.port_name(state, record.port)] = {
                    "mac": mac_str(record.mac), "owner": kind.removeprefix("refused_mac_"), "at": time.time()}
            key = (record.port, kind) if record.port else (0, kind, bytes(record.mac))
            if key in self.window:
                self.window[key][1] += 1
                continue
            line, fields = self.describe(state, record, kind)
            event(kind, line, level=logging.WARNING, **fields)
            self.window[key] = [now_ns, 0, line, fields]
        for key, (first_ns, more, line, fields) in list(self.window.items()):
            if now_ns - first_ns >= self.interval_ns:
                del self.window[key]
                if more:
                    event(key[1], f"... and {more} more like it in the last {self.interval_ns / 1e9:g} s: {line}",
                          level=logging.WARNING, repeated=more, **fields)
        for port, forged in list(state.forged_sources.items()):
            if time.time() - forged["at"] > FORGED_SOURCE_KEEP_S:
                del state.forged_sources[port]
        for key, port_state in state.maps.ports.items():
            last = self.suppressed.get(key.value, 0)
            if port_state.events_suppressed > last:
                event("events_suppressed", f"{self.port_name(state, key.value)} sent more events than its rate "
                      f"allows: {port_state.events_suppressed - last} not reported", level=logging.WARNING,
                      port=self.port_name(state, key.value), suppressed=port_state.events_suppressed - last)
            self.suppressed[key.value] = port_state.events_suppressed

    def port_name(self, state, index: int) -> str:
        if index == 0:
            return "the LAN"
        if index not in self.names:
            link = netlink.link_by_index(state.ipr, index)
            self.names[index] = link.name if link else f"port {index}"
        return self.names[index]

    def describe(self, state, record, kind: str) -> tuple[str, dict]:
        mac, other, ip = mac_str(record.mac), mac_str(record.other), ip_str(record.ip)
        port = self.port_name(state, record.port)
        fields = {"mac": mac, "ip": ip, "port": port, "other_mac": other}
        if kind in WHY_REFUSED:
            why = WHY_REFUSED[kind]
            if kind == "refused_host_ip":
                why += f" ({state.host_addresses.get(ip, '?')})"
            elif kind in ("refused_claim", "refused_static"):
                why += f": {other}"
            return f"refused: VM {mac} claims {ip}, {why} (on {port})", fields
        if kind.startswith("refused_limit_"):
            return f"refused: VM {mac} on {port}: the port is at its limit of {kind.removeprefix('refused_limit_')}", fields
        if kind in MAC_OWNERS:
            return f"refused: frames from {port} with source MAC {mac}, {MAC_OWNERS[kind]}", fields
        if kind == "refused_pppoe":
            return f"refused: PPPoE from VM {mac} on {port}: another VM's PPPoE is active (one VM at a time)", fields
        if kind == "dad_conflict":
            return f"LAN host {other} probes (DAD) {ip} of VM {mac}: the binding goes until the VM defends it", fields
        if kind == "lan_ip_conflict":
            return f"LAN host {mac} uses {ip}, bound to VM {other} (on {port})", fields
        if kind == "dhcp_ack_unmatched":
            return f"DHCPACK from {mac} giving {ip} to {other} answers no request of that VM: ignored", fields
        return f"{kind}: {mac} {ip} (on {port})", fields
