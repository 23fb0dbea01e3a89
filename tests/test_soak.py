"""A minute of `macnat soak` (the documented command soaks for 30): it runs, and what it reports holds."""

import subprocess

from macnat import lab
from macnat.lab import MACNAT


def test_a_minute_of_soak(tmp_path):
    proc = subprocess.run([MACNAT, "soak", "--minutes", "1", "--output", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "soak.md").read_text()
    assert "## Loss" in report and "## The manager over time" in report
    for flow in ("| ping_vm1 |", "| udp_up |", "| udp_down |", "| tcp_up |"):
        assert flow in report
    assert "killed the manager and started it again" in proc.stderr
    started = int(report.split("New VMs: ")[1].split(" started")[0])
    assert started >= 2 and f"{started} leased" in report and f"{started} reached" in report, report
    assert not lab.is_up(), "the soak removes its lab"
