"""The bindings table as `macnat table` prints it: rows in family and address order, and JSON that
reads back (one object per line)."""

from __future__ import annotations

import json

from macnat import constants, tables
from macnat.maps import Binding, ip_key, mac_bytes
from test_duties import FakeMaps

VM_MAC = "52:54:00:00:01:01"


def maps_with(*addresses: str) -> FakeMaps:
    maps = FakeMaps()
    for n, ip in enumerate(addresses):
        maps.bindings.update(ip_key(ip), Binding(mac=mac_bytes(VM_MAC), flags=constants.BINDING_STATIC if n == 0 else 0,
                                                 last_seen_ns=1, tx_packets=n, rx_bytes=10 * n))
    return maps


def test_rows_come_ipv4_first_then_ipv6_each_by_address():
    maps = maps_with("fe80::5054:ff:fe00:101", "192.168.77.134", "2001:db8:77::134", "10.0.0.9", "192.168.77.20")
    rows = tables.binding_rows(maps, "wlan0")
    assert [r["ip"] for r in rows] == ["10.0.0.9", "192.168.77.20", "192.168.77.134", "2001:db8:77::134",
                                       "fe80::5054:ff:fe00:101"]
    assert [r["family"] for r in rows] == ["ipv4"] * 3 + ["ipv6"] * 2
    link_local = rows[-1]
    assert (link_local["kind"], link_local["mac"], link_local["wifi"]) == ("static", VM_MAC, "wlan0")
    assert (rows[0]["tx_packets"], rows[0]["rx_bytes"]) == (3, 30)


def test_json_lines_reads_back_with_one_object_per_line():
    rows = tables.binding_rows(maps_with("192.168.77.134", "192.168.77.135", "2001:db8:77::134"), "wlan0")
    text = tables.json_lines(rows)
    assert json.loads(text) == rows
    lines = text.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == len(rows) + 2
    assert all(json.loads(line.rstrip(",")) == row for line, row in zip(lines[1:-1], rows))
    vms = tables.by_vm(rows)
    assert json.loads(tables.json_lines(vms)) == vms and tables.json_lines([]) == "[]"
