"""`macnat watch`: a live view of an attachment, refreshed in place (rich Live): the network it is on,
each VM (MAC, addresses, last seen, rates each way), and the datapath counters that moved since the
last refresh. q or Ctrl-C quits. It reads what `table`, `stats` and `status` read, so it works from
any directory and over `ip netns exec` like them.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from macnat import constants, tables


def rate(now: dict, before: dict | None, key: str, seconds: float) -> float:
    return max(0, now[key] - before[key]) / seconds if before else 0.0


def human(value: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G"):
        if value < 1000:
            return f"{value:.0f} {prefix}{unit}" if prefix == "" else f"{value:.1f} {prefix}{unit}"
        value /= 1000
    return f"{value:.1f} T{unit}"


class View:
    def __init__(self, find_attachments):
        self.find_attachments = find_attachments
        self.previous_vms: dict[tuple[str, str], dict] = {}
        self.previous_counters: dict[str, dict[str, int]] = {}
        self.previous_time: float | None = None

    def render(self) -> Group:
        now = time.monotonic()
        seconds = now - self.previous_time if self.previous_time else 0.0
        parts = []
        vms_table = Table("VM (MAC)", "IPv4", "IPv6", "last seen", "to Wi-Fi", "from Wi-Fi", "Wi-Fi",
                          title="VMs", title_justify="left")
        moved = Table("counter", "change", "total", "meaning", title="counters that moved", title_justify="left")
        vms_now: dict[tuple[str, str], dict] = {}
        counters_now: dict[str, dict[str, int]] = {}
        for found in self.find_attachments():
            try:
                described = found.describe()
                network = f" on {described['network']}" if described.get("network") else ""
                parts.append(Text(f"{found.wifi_name} ({described['wifi_mac']}) <-> {described['bridge']}: "
                                  f"{described['state']}{network}", style="bold"))
                for vm in tables.by_vm(tables.binding_rows(found.maps, found.wifi_name)):
                    key = (vm["wifi"], vm["mac"])
                    vms_now[key] = vm
                    before = self.previous_vms.get(key) if seconds else None
                    vms_table.add_row(
                        vm["mac"], "\n".join(vm["ipv4"]), "\n".join(vm["ipv6"]), f"{vm['last_seen_s']} s ago",
                        f"{human(rate(vm, before, 'tx_packets', seconds or 1), 'pkt/s')} "
                        f"{human(rate(vm, before, 'tx_bytes', seconds or 1) * 8, 'bit/s')}",
                        f"{human(rate(vm, before, 'rx_packets', seconds or 1), 'pkt/s')} "
                        f"{human(rate(vm, before, 'rx_bytes', seconds or 1) * 8, 'bit/s')}",
                        vm["wifi"])
                totals = found.maps.counter_totals()
                counters_now[found.wifi_name] = totals
                before_counters = self.previous_counters.get(found.wifi_name, {})
                for name, value in totals.items():
                    change = value - before_counters.get(name, value)
                    if change:
                        moved.add_row(name, f"+{change}", str(value), constants.COUNTERS[name])
            finally:
                found.close()
        if not parts:
            parts.append(Text("macnat is not attached in this network namespace", style="bold"))
        self.previous_vms, self.previous_counters, self.previous_time = vms_now, counters_now, now
        return Group(*parts, vms_table, moved, Text("q or Ctrl-C quits", style="dim"))


@contextlib.contextmanager
def keys():
    """Single key presses from the terminal (nothing when stdin is not one)."""
    if not sys.stdin.isatty():
        yield lambda timeout: (time.sleep(timeout), "")[1]
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        def read(timeout: float) -> str:
            if select.select([fd], [], [], timeout)[0]:
                return os.read(fd, 16).decode(errors="ignore")
            return ""
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(find_attachments, interval: float, console) -> None:
    view = View(find_attachments)
    try:
        with keys() as read_key, Live(view.render(), console=console, auto_refresh=False, screen=False) as live:
            while True:
                if "q" in read_key(interval).lower():
                    return
                live.update(view.render(), refresh=True)
    except KeyboardInterrupt:
        return
