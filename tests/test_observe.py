"""Seeing what macnat does, as a user does: `macnat watch` on a terminal (a pseudo-terminal here),
Prometheus metrics from the textfile and from the listener, parsed with prometheus_client's parser."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from macnat import lab
from macnat.lab import MACNAT, RunningManager, ping
from test_attach import VM1, VM2, wait_for


def read_pty(fd: int, seconds: float) -> str:
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out.decode(errors="replace")


def test_watch_shows_the_vms_rates_and_counters_and_quits_on_q(tmp_path):
    lab.up()
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        leases = lab.dhcp_all()
        flood = lab.LANHOST.ns.spawn("ping", "-n", "-q", "-i", "0.05", "-c", "200", leases["vm1"])
        controller, terminal = pty.openpty()
        watch = subprocess.Popen(lab.LAPTOP.ns.exec_argv(MACNAT, "watch", "--interval", "0.5"),
                                 stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
                                 env={**os.environ, "COLUMNS": "160", "LINES": "50", "TERM": "xterm"})
        os.close(terminal)
        screen = read_pty(controller, 4)
        assert "wlan0 (02:4d:4e:00:00:0a) <-> vmbr0: attached on 192.168.77.0/24" in screen, screen
        assert VM1.mac in screen and leases["vm1"] in screen and VM2.mac in screen
        assert "pkt/s" in screen and "wifi_to_vm" in screen, "a rate and a counter that moved"
        os.write(controller, b"q")
        assert watch.wait(5) == 0
        os.close(controller)
        flood.kill()
    finally:
        manager.stop()
        lab.down()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(metric, **labels) -> float:
    return next(s.value for s in metric.samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_prometheus_textfile_and_listener(tmp_path):
    lab.up()
    textfile = tmp_path / "node-exporter" / "macnat-wlan0.prom"
    config = tmp_path / "wlan0.toml"
    config.write_text(f'bridge = "vmbr0"\nage = 3\n[metrics]\ntextfile = "{textfile}"\nlisten = "127.0.0.1:9877"\n')
    manager = RunningManager("--config", str(config), log=tmp_path / "manager.log", bridge=None)
    try:
        leases = lab.dhcp_all()
        assert ping(lab.LANHOST.ns, leases["vm1"])
        assert wait_for(lambda: textfile.exists(), timeout=5)
        assert wait_for(lambda: "macnat_wifi_to_vm_frames_total" in textfile.read_text()
                        and 'family="ipv4",kind="learned"' in textfile.read_text()
                        and sample(families(textfile.read_text())["macnat_bindings"], family="ipv4", kind="learned") >= 2,
                        timeout=25), textfile.read_text()
        from_file = families(textfile.read_text())
        assert sample(from_file["macnat_wifi_to_vm_frames"], wifi="wlan0") > 0
        assert sample(from_file["macnat_attached"], wifi="wlan0") == 1
        assert from_file["macnat_dropped_frames"].type == "counter"
        assert {s.labels["reason"] for s in from_file["macnat_dropped_frames"].samples} >= {"echo", "malformed"}
        network = from_file["macnat_network_info"].samples[0].labels
        assert network["subnet"] == "192.168.77.0/24" and network["state"] == "attached"
        assert from_file["macnat_build_info"].samples[0].labels["version"]
        scraped = lab.LAPTOP.ns.run("python3", "-c", "import urllib.request; "
                                    "print(urllib.request.urlopen('http://127.0.0.1:9877/metrics').read().decode())").stdout
        assert sample(families(scraped)["macnat_vms"], wifi="wlan0") >= 2
        for family in families(scraped).values():
            assert family.documentation, f"{family.name} has a HELP line"
    finally:
        manager.stop()
        lab.down()
    assert not textfile.exists(), "a stopped service exports nothing stale"
