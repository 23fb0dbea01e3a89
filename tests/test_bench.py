"""The benchmark command keeps working (a quick smoke run; real numbers come from `macnat bench`)."""

import re
import subprocess
import time

from macnat import lab
from macnat.bench import cpu
from macnat.lab import MACNAT


def test_quick_benchmark_writes_a_report_and_a_plot(tmp_path):
    proc = subprocess.run([MACNAT, "bench", "--quick", "--output", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "benchmarks.md").read_text()
    for section in ("## 1. Per-packet datapath cost", "## 2. Table scale", "## 3. Throughput and latency in the lab",
                    "## 4. Learning", "## 5. Cost of running it", "## 6. Recovery from the laptop's Wi-Fi events", "## 7. The manager at scale",
                    "## 8. CPU per byte", "### Time inside macnat's programs"):
        assert section in report
    for row in ("| VM -> Wi-Fi, IPv4 unicast | yes |", "| Wi-Fi -> VM, IPv6 unicast | yes |", "| (b) macnat |",
                "| (c) ebtables-nft MAC NAT |", "| (d) parprouted + dhcp-helper |", "| (e) masquerade NAT"):
        assert row in report
    # the kernel timed each program under the lab's traffic: a time for every flow of the VM's frames
    assert re.search(r"\| `uplink_egress` \| \d+ ns \| \d+ ns \| \d+ ns \| \d+ ns \|", report), report
    assert "| VM -> Wi-Fi, then wlan0 egress (marked by uplink_egress) | yes |" in report
    assert "first probes lost, VM -> LAN: 0, LAN -> VM: 0" in report
    assert "| Wi-Fi interface deleted and created again: back -> next reply |" in report
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not lab.is_up(), "the benchmark removes its lab"


def test_busy_time_never_runs_backwards_while_the_machine_idles():
    """cpuidle credits an idle period when the CPU wakes from it: read from another CPU, a sleeping one
    looked busy, then gave that time back at once (busy time swung from -1 to +1 CPU-second per second)."""
    readings = []
    for _ in range(40):
        readings.append(cpu.busy_seconds())
        time.sleep(0.05)
    steps = [later - earlier for earlier, later in zip(readings, readings[1:])]
    assert min(steps) > -0.001, steps
