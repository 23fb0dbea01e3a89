"""The bindings table as rows for people and programs: `macnat table`, `macnat watch`, the metrics.

Read at once from a snapshot (one BPF_MAP_LOOKUP_BATCH per 4,096 elements) and turned into rows
without a ctypes object per element, so a full table (65,536 bindings) is listed in well under a
second.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from macnat import constants
from macnat.clock import monotonic_ns
from macnat.maps import IPV4_MAPPED_PREFIX, Binding, Maps, Snapshot, mac_str

COUNTERS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
FAMILIES = ("ipv4", "ipv6")
KINDS = ("learned", "static")


def binding_counts(table: Snapshot) -> dict[tuple[str, str], int]:
    """(family, kind) -> how many bindings, from a snapshot of the bindings table."""
    counts = {(family, kind): 0 for family in FAMILIES for kind in KINDS}
    for key, flags in zip(table.key_list(), table.field("flags", Binding)):
        family = "ipv4" if key[:12] == IPV4_MAPPED_PREFIX else "ipv6"
        counts[family, "static" if flags & constants.BINDING_STATIC else "learned"] += 1
    return counts


def binding_rows(maps: Maps, wifi: str) -> list[dict]:
    """One row per binding, sorted by family and address."""
    table = maps.bindings.snapshot()
    keys = table.key_list()
    macs, flags, seen, tx_packets, tx_bytes, rx_packets, rx_bytes = (
        table.field(name, Binding) for name in ("mac", "flags", "last_seen_ns", *COUNTERS))
    names = {mac: mac_str(mac) for mac in set(macs)}
    now = monotonic_ns()
    rows = []
    # Raw key order is family order: IPv4 keys are mapped (::ffff:0:0/96), and no VM may bind an
    # IPv6 address in ::/8 (the datapath refuses it for exactly that reason).
    for i in sorted(range(len(keys)), key=keys.__getitem__):
        key = keys[i]
        ipv4 = key[:12] == IPV4_MAPPED_PREFIX
        rows.append({
            "ip": socket.inet_ntop(socket.AF_INET, key[12:]) if ipv4 else socket.inet_ntop(socket.AF_INET6, key),
            "family": "ipv4" if ipv4 else "ipv6", "mac": names[macs[i]],
            "kind": "static" if flags[i] & constants.BINDING_STATIC else "learned",
            "last_seen_s": round(max(0, now - seen[i]) / 1e9, 1), "wifi": wifi,
            "tx_packets": tx_packets[i], "tx_bytes": tx_bytes[i], "rx_packets": rx_packets[i], "rx_bytes": rx_bytes[i],
        })
    return rows


@dataclass(frozen=True)
class RowFilter:
    """What `macnat table --mac/--ip/--family/--kind` keeps."""

    mac: str | None = None
    ip: str | None = None        # an address, or a network in CIDR notation
    family: str | None = None
    kind: str | None = None

    def __post_init__(self):
        if self.family not in (None, *FAMILIES):
            raise ValueError(f"--family takes ipv4 or ipv6, not '{self.family}'")
        if self.kind not in (None, *KINDS):
            raise ValueError(f"--kind takes learned or static, not '{self.kind}'")
        if self.ip is not None:
            try:
                ipaddress.ip_network(self.ip, strict=False)
            except ValueError:
                raise ValueError(f"--ip takes an address or a network like 192.168.1.0/24, not '{self.ip}'") from None

    def keep(self, rows: Iterable[dict]) -> list[dict]:
        network = ipaddress.ip_network(self.ip, strict=False) if self.ip else None
        mac = self.mac.lower() if self.mac else None
        return [r for r in rows
                if (mac is None or r["mac"] == mac) and (self.family is None or r["family"] == self.family)
                and (self.kind is None or r["kind"] == self.kind)
                and (network is None or ipaddress.ip_address(r["ip"]) in network)]


def by_vm(rows: Iterable[dict]) -> list[dict]:
    """One row per VM (MAC): its addresses, when it was last seen, its traffic each way."""
    vms: dict[tuple[str, str], dict] = {}
    for r in rows:
        vm = vms.setdefault((r["wifi"], r["mac"]), {"mac": r["mac"], "wifi": r["wifi"], "ipv4": [], "ipv6": [],
                                                    "static": [], "last_seen_s": r["last_seen_s"],
                                                    **{name: 0 for name in COUNTERS}})
        vm[r["family"]].append(r["ip"])
        if r["kind"] == "static":
            vm["static"].append(r["ip"])
        vm["last_seen_s"] = min(vm["last_seen_s"], r["last_seen_s"])
        for name in COUNTERS:
            vm[name] += r[name]
    return sorted(vms.values(), key=lambda vm: (vm["wifi"], vm["mac"]))


def json_lines(rows: list[dict]) -> str:
    """A JSON array with one object per line: readable, and written in one call of json's C encoder
    (an indented dump of 65,536 rows takes seconds, a dump per row twice as long as this). Objects
    are split at "}, {", which no value can contain: they are addresses, MACs, numbers, fixed words
    and interface names, and the kernel allows no whitespace in those."""
    import json

    if not rows:
        return "[]"
    return "[\n" + json.dumps(rows)[1:-1].replace("}, {", "},\n{") + "\n]"
