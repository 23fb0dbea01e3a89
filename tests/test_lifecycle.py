"""macnat over time and against a difficult world, each on a lab of its own: ageing, renewals, an AP
that turns broadcasts into unicast, and a machine missing bcc or kernel headers."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from macnat import lab
from macnat.lab import MACNAT, RunningManager, macnat, ping
from test_attach import VM1, VM2, counters, lock_file, macnat_objects, table, wait_for


def test_ageing_keeps_live_vms_through_probes_and_removes_silent_ones(fresh_lab, tmp_path):
    static_ip = "192.168.77.60"
    manager = RunningManager("--age", "3", "--static", f"{static_ip}={VM2.mac}", log=tmp_path / "manager.log")
    try:
        leases = lab.dhcp_all()
        assert ping(VM1.ns, lab.LANHOST.ip) and ping(VM2.ns, lab.LANHOST.ip)
        assert {leases["vm1"], leases["vm2"], static_ip} <= set(table())
        VM1.ns.ip("link", "set", "eth0", "down")  # vm1 falls silent; vm2 stays up but sends nothing
        assert wait_for(lambda: leases["vm1"] not in table(), timeout=10)
        assert f"expired {leases['vm1']} at {VM1.mac}" in manager.text()
        rows = table()
        assert leases["vm2"] in rows, "an idle VM that answers unicast ARP probes is kept"
        assert rows[static_ip]["kind"] == "static" and rows[static_ip]["mac"] == VM2.mac
    finally:
        assert manager.stop() == 0
    assert macnat_objects() == {"filters": "", "clsact": False, "uplink": []}


def test_wifi_mac_change_is_followed(fresh_lab, tmp_path):
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        ip = lab.dhcp("vm1")
        assert ping(lab.LANHOST.ns, ip)
        new_mac = "02:4d:4e:00:00:0b"
        lab.reassociate(new_mac)  # the station comes back with another MAC (MAC randomisation)
        assert wait_for(lambda: f"changed its MAC from {lab.LAPTOP.mac} to {new_mac}" in manager.text(), timeout=5)
        lab.LANHOST.ns.ip("neigh", "flush", "dev", "eth0")
        assert ping(lab.LANHOST.ns, ip) and ping(VM1.ns, lab.LANHOST.ip)
        assert lab.neighbours(lab.LANHOST.ns)[ip] == new_mac
        (status,) = json.loads(macnat("status", "--json").stdout)
        assert status["wifi_mac"] == new_mac
        assert lab.ap_drops() == {"from_unassociated": 0, "to_unassociated": 0, "chaddr_mismatch": 0}
    finally:
        assert manager.stop() == 0


def test_detach_removes_an_attachment_whose_manager_died(fresh_lab, tmp_path):
    manager = RunningManager(log=tmp_path / "manager.log")
    manager.stop(signal.SIGKILL)
    assert lock_file().exists(), "a killed manager cannot remove its lock file"
    assert macnat("detach", "wlan0").stdout.strip() == "detached from wlan0"
    assert macnat_objects() == {"filters": "", "clsact": False, "uplink": []}
    assert not lock_file().exists()
    proc = macnat("detach", check=False)
    assert proc.returncode == 1 and "not attached" in proc.stderr


def test_ageing_probes_ipv6_bindings_with_unicast_neighbour_solicitations(tmp_path):
    lab.up(lab.Knobs(ipv6=True))
    manager = RunningManager("--age", "3", "-v", log=tmp_path / "manager.log")
    try:
        slaac = {vm: lab.wait_slaac(vm) for vm in lab.VMS}
        assert ping(VM1.ns, lab.LANHOST.ip6) and ping(VM2.ns, lab.LANHOST.ip6)
        assert set(slaac.values()) <= set(table())
        VM1.ns.ip("link", "set", "eth0", "down")
        assert wait_for(lambda: slaac["vm1"] not in table(), timeout=10)
        assert f"expired {slaac['vm1']} at {VM1.mac}" in manager.text()
        assert slaac["vm2"] in table(), "an idle VM that answers unicast NS probes is kept"
        assert f"probing idle {slaac['vm2']} at {VM2.mac}" in manager.text()
    finally:
        manager.stop()
        lab.down()


def test_dhcp_renewal_is_answered(fresh_lab, tmp_path):
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        ip = lab.dhcp("vm1", renew_after=2)
        assert ip
        acks = lambda: (lab.STATE_DIR / "dnsmasq.log").read_text().count(f"DHCPACK(eth0) {ip} {VM1.mac}")
        assert wait_for(lambda: acks() >= 2, timeout=10), "the unicast RENEW got its ACK"
        assert lab.vm_ip("vm1") == ip
        assert ping(lab.LANHOST.ns, ip)
    finally:
        manager.stop()


def test_ap_that_delivers_broadcast_as_unicast(tmp_path):
    lab.up(lab.Knobs(mcast_to_ucast=True))
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        leases = lab.dhcp_all()  # the server's broadcast OFFER/ACK reach wlan0 as unicast
        assert all(leases.values()), leases
        assert ping(lab.LANHOST.ns, leases["vm1"]) and ping(lab.LANHOST.ns, leases["vm2"])
        assert counters()["group_restored"] >= 2
    finally:
        manager.stop()
        lab.down()


@pytest.mark.parametrize("hidden, message", [
    ("/usr/lib/python3/dist-packages", "macnat: error: bcc is missing: install Debian's python3-bpfcc "
                                       "(apt install python3-bpfcc); PyPI's 'bcc' is an unrelated package"),
    (f"/lib/modules/{os.uname().release}", f"macnat: error: no kernel headers at /lib/modules/{os.uname().release}/build"),
], ids=["bcc", "headers"])
def test_missing_bcc_or_headers_is_one_clear_line_and_leaves_nothing(fresh_lab, hidden, message):
    # A private mount namespace hides them from this one command, exactly as a machine without them.
    script = f"mount -t tmpfs none {hidden} && exec ip netns exec {lab.LAPTOP.ns.name} {MACNAT} attach wlan0 vmbr0"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert macnat_objects() == {"filters": "", "clsact": False, "uplink": []}
    assert json.loads(macnat("status", "--json").stdout) == []
