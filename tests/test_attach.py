"""macnat in the lab, through the CLI exactly as a user runs it (`macnat attach wlan0 vmbr0` in the
laptop's namespace): VMs become full hosts of the emulated Wi-Fi LAN."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from macnat import attachment, cli, lab, plumbing
from macnat.attachment import RUN_DIR
from macnat.datapath import Datapath
from macnat.maps import OtherBuild
from macnat.plumbing import uplink_names
from macnat.lab import MACNAT, RunningManager, macnat, neighbours, ping
from nettest import tcp_transfer

VM1, VM2 = lab.VMS["vm1"], lab.VMS["vm2"]
UPLINK, UPLINK_PEER = uplink_names(lab.LAPTOP.ifname)


def wait_for(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def table() -> dict[str, dict]:
    return {row["ip"]: row for row in json.loads(macnat("table", "--json").stdout)}


def counters() -> dict[str, int]:
    return json.loads(macnat("stats", "--json").stdout)["wlan0"]


def lock_file() -> Path:
    """The manager's lock for the lab's wlan0 (keyed by the laptop namespace's inode)."""
    return RUN_DIR / f"{os.stat(f'/run/netns/{lab.LAPTOP.ns.name}').st_ino}-wlan0.lock"


def macnat_objects() -> dict:
    """What an attachment leaves in the kernel, as a person would look for it."""
    ns = lab.LAPTOP.ns
    return {
        "filters": ns.run("tc", "filter", "show", "dev", "wlan0", "ingress").stdout
        + ns.run("tc", "filter", "show", "dev", "wlan0", "egress").stdout,
        "clsact": "clsact" in ns.run("tc", "qdisc", "show", "dev", "wlan0").stdout,
        "uplink": [ln for ln in ns.ip("-o", "link").splitlines() if " vethmn" in ln or " mnpeer" in ln],
    }


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    lab.up()
    manager = RunningManager(log=tmp_path_factory.mktemp("attach") / "manager.log")
    leases = lab.dhcp_all()
    yield manager, leases
    manager.stop()  # SIGTERM, as a user stops it: the manager detaches and removes its lock file
    lab.down()


def test_both_vms_get_distinct_leases_from_the_lan_server(attached):
    _, leases = attached
    assert all(ip and ip.startswith("192.168.77.") for ip in leases.values()), leases
    assert leases["vm1"] != leases["vm2"]
    served = (lab.STATE_DIR / "dnsmasq.leases").read_text()
    assert VM1.mac in served and VM2.mac in served, "dnsmasq leased to the VMs' own MACs (chaddr kept)"
    assert counters()["dhcp_flag_set"] >= 2
    rows = table()  # nothing has been sent from the leased addresses yet: the ACKs bound them
    assert rows[leases["vm1"]]["mac"] == VM1.mac and rows[leases["vm1"]]["tx_packets"] == 0
    assert rows[leases["vm2"]]["mac"] == VM2.mac


def test_pings_in_every_direction(attached):
    _, leases = attached
    assert ping(VM1.ns, lab.LANHOST.ip), "VM -> LAN host"
    assert ping(lab.LANHOST.ns, leases["vm1"]), "LAN host -> VM"
    assert ping(lab.LAPTOP.ns, leases["vm2"]), "host -> VM"
    assert ping(VM2.ns, lab.LAPTOP.ip), "VM -> host"
    assert ping(VM1.ns, leases["vm2"]) and ping(VM2.ns, leases["vm1"]), "VM <-> VM"
    assert ping(VM1.ns, lab.ROUTER.ip), "VM -> gateway"
    assert lab.ap_drops() == {"from_unassociated": 0, "to_unassociated": 0, "chaddr_mismatch": 0}


def test_vm_to_vm_never_passes_through_the_translation(attached):
    _, leases = attached
    assert ping(VM1.ns, leases["vm2"])  # resolved: what follows is unicast between the two VMs
    before = table()
    assert ping(VM1.ns, leases["vm2"], count=5)
    after = table()
    for ip in leases.values():
        assert after[ip]["tx_packets"] == before[ip]["tx_packets"] and after[ip]["rx_packets"] == before[ip]["rx_packets"]


def test_lan_sees_every_vm_at_the_stations_mac(attached):
    _, leases = attached
    assert ping(lab.LANHOST.ns, leases["vm1"]) and ping(lab.LANHOST.ns, leases["vm2"])
    seen = neighbours(lab.LANHOST.ns)
    assert seen[leases["vm1"]] == seen[leases["vm2"]] == lab.LAPTOP.mac


def test_tcp_transfer_both_ways(attached):
    _, leases = attached
    up = tcp_transfer(lab.LANHOST.ns, lab.LANHOST.ip, VM1.ns)
    down = tcp_transfer(lab.LANHOST.ns, lab.LANHOST.ip, VM1.ns, reverse=True)
    assert up > 100e6 and down > 100e6, (up, down)


def test_table_json_lists_both_vms(attached):
    _, leases = attached
    rows = table()
    assert rows[leases["vm1"]]["mac"] == VM1.mac and rows[leases["vm2"]]["mac"] == VM2.mac
    assert {rows[ip]["kind"] for ip in leases.values()} == {"learned"}
    assert all(rows[ip]["tx_packets"] > 0 and rows[ip]["rx_packets"] > 0 for ip in leases.values())
    human = macnat("table").stdout
    assert leases["vm1"] in human and VM1.mac in human


def test_status_and_stats_report_the_attachment(attached):
    manager, _ = attached
    (status,) = json.loads(macnat("status", "--json").stdout)
    assert (status["wifi"], status["bridge"], status["manager_pid"], status["complete"]) == ("wlan0", "vmbr0", manager.proc.pid, True)
    c = counters()
    assert c["vm_to_wifi"] > 0 and c["wifi_to_vm"] > 0 and c["learned_ip"] >= 2
    assert "vm_to_wifi" in macnat("stats").stdout


def test_lan_macs_become_fdb_entries_on_the_uplink(attached):
    assert ping(VM1.ns, lab.LANHOST.ip)
    fdb = lambda: lab.LAPTOP.ns.run("bridge", "fdb", "show", "dev", UPLINK).stdout
    assert wait_for(lambda: lab.LANHOST.mac in fdb(), timeout=5)
    assert f"{lab.LANHOST.mac} sticky master vmbr0 static" in fdb()
    assert f"{lab.LAPTOP.mac} sticky master vmbr0 static" in fdb()


def test_a_vm_claiming_the_hosts_address_is_refused(attached):
    manager, _ = attached
    VM2.ns.ip("addr", "add", f"{lab.LAPTOP.ip}/32", "dev", "eth0")
    try:
        VM2.ns.run("ping", "-c1", "-W1", "-I", lab.LAPTOP.ip, lab.LANHOST.ip, check=False)
        assert counters()["refused_host_ip"] >= 1
        assert wait_for(lambda: f"claims {lab.LAPTOP.ip}" in manager.text(), timeout=5)
        assert f"refused: VM {VM2.mac} claims {lab.LAPTOP.ip}, an address of this host (wlan0)" in manager.text()
        assert lab.LAPTOP.ip not in table()
        assert ping(lab.LANHOST.ns, lab.LAPTOP.ip), "the host keeps its address"
    finally:
        VM2.ns.ip("addr", "del", f"{lab.LAPTOP.ip}/32", "dev", "eth0")


def test_an_address_the_host_gains_later_is_protected_too(attached):
    manager, _ = attached
    taken = "192.168.77.12"
    VM2.ns.ip("addr", "add", f"{taken}/32", "dev", "eth0")
    try:
        VM2.ns.run("ping", "-c1", "-W1", "-I", taken, lab.LANHOST.ip, check=False)
        assert table()[taken]["mac"] == VM2.mac
        lab.LAPTOP.ns.ip("addr", "add", f"{taken}/24", "dev", "wlan0")  # the host takes it, seen over netlink
        assert wait_for(lambda: taken not in table(), timeout=3)
        assert f"{taken} is now an address of this host (wlan0): removed its binding to VM {VM2.mac}" in manager.text()
        before = counters()["refused_host_ip"]
        VM2.ns.run("ping", "-c1", "-W1", "-I", taken, lab.LANHOST.ip, check=False)
        assert counters()["refused_host_ip"] > before and taken not in table()
    finally:
        VM2.ns.ip("addr", "del", f"{taken}/32", "dev", "eth0")
        lab.LAPTOP.ns.run("ip", "addr", "del", f"{taken}/24", "dev", "wlan0", check=False)


def test_no_first_frame_is_lost_for_a_new_address(attached):
    """Exactly one probe each way, for VM addresses never seen before: the VM's first ARP is learned
    while it is forwarded, so the reply finds the binding, and the first echo request (to a MAC the
    bridge may still flood) is answered."""
    VM1.ns.ip("addr", "add", "192.168.77.61/24", "dev", "eth0")
    VM2.ns.ip("addr", "add", "192.168.77.62/24", "dev", "eth0")
    try:
        VM1.ns.ip("neigh", "flush", "dev", "eth0")
        assert not {"192.168.77.61", "192.168.77.62"} & set(table())
        first = VM1.ns.run("ping", "-c1", "-W2", "-I", "192.168.77.61", lab.ROUTER.ip, check=False)
        assert first.returncode == 0, first.stdout
        assert ping(lab.LANHOST.ns, "192.168.77.62", count=1)
    finally:
        VM1.ns.ip("addr", "del", "192.168.77.61/24", "dev", "eth0")
        VM2.ns.ip("addr", "del", "192.168.77.62/24", "dev", "eth0")


def test_truncated_ipv4_from_a_vm_is_dropped_and_counted(attached):
    # br_netfilter (bridge-nf-call-iptables=1, as on a Proxmox host with its firewall) already drops
    # such a frame in the bridge; without it, the frame reaches macnat, which must not forward it.
    sysctl = "net.bridge.bridge-nf-call-iptables"
    lab.LAPTOP.ns.run("sysctl", "-qw", f"{sysctl}=0")
    try:
        before = counters()["drop_malformed"]
        frame = bytes.fromhex(lab.LANHOST.mac.replace(":", "") + VM1.mac.replace(":", "") + "0800" + "450000")
        VM1.ns.run("python3", "-c", "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
                   f"s.bind(('eth0', 0)); s.send(bytes.fromhex('{frame.hex()}'))")
        time.sleep(0.2)
        assert counters()["drop_malformed"] == before + 1
    finally:
        lab.LAPTOP.ns.run("sysctl", "-qw", f"{sysctl}=1")


def test_errors_are_one_line_and_leave_nothing(attached):
    manager, _ = attached
    before = macnat_objects()
    cases = {
        ("attach", "wlan9", "vmbr0"): "no interface named 'wlan9'",
        ("attach", "wlan0", "tap101"): "'tap101' is not a bridge",
        ("attach", "wlan0", "vmbr0"): f"'wlan0' is already attached and managed by pid {manager.proc.pid}",
        ("attach", "vmbr0", "vmbr0"): "'vmbr0' is a bridge",
        ("attach", "wlan0", "vmbr0", "--static", "1.2.3.4=zz"): "'zz' is not a MAC address",
        ("table", "--wifi", "tap101"): "macnat is not attached to 'tap101'",
    }
    for args, message in cases.items():
        proc = macnat(*args, check=False)
        assert proc.returncode == 1, args
        assert proc.stderr.strip().splitlines() == [f"macnat: error: {proc.stderr.strip().removeprefix('macnat: error: ')}"]
        assert message in proc.stderr, (args, proc.stderr)
    not_root = subprocess.run(lab.LAPTOP.ns.exec_argv("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                                      MACNAT, "table"), capture_output=True, text=True)
    assert not_root.returncode == 1 and not_root.stderr.strip() == \
        "macnat: error: must run as root (macnat loads BPF programs and changes network devices)"
    assert macnat_objects() == before


def test_kill_9_keeps_traffic_flowing_and_a_new_attach_adopts(attached, tmp_path):
    manager, leases = attached
    manager.stop(signal.SIGKILL)
    assert ping(VM1.ns, lab.LANHOST.ip, count=3), "the datapath forwards without its manager"
    assert ping(lab.LANHOST.ns, leases["vm2"], count=3)
    (status,) = json.loads(macnat("status", "--json").stdout)
    assert status["manager_pid"] is None and "no manager" in macnat("status").stdout
    successor = RunningManager(log=tmp_path / "successor.log")
    manager.proc, manager.log = successor.proc, successor.log  # the next tests and the teardown stop it
    assert "adopting the running datapath on wlan0" in successor.text()
    assert f"{leases['vm1']} at {VM1.mac}" in successor.text()
    assert set(leases.values()) <= set(table())


def test_a_datapath_another_version_built_is_replaced_not_adopted(attached, tmp_path):
    """An upgrade restarts the unit over the old version's datapath: same programs, tables that may mean
    other things. The new manager replaces it, and the VMs are learned again from their next frames."""
    manager, leases = attached
    (status,) = json.loads(macnat("status", "--json").stdout)
    manager.stop(signal.SIGKILL)
    old = Datapath.from_ids(status["programs"])
    plumbing.update_config(old.maps, build=old.maps.current_config().build ^ 1)   # as another version's
    old.close()
    successor = RunningManager(log=tmp_path / "successor.log")
    manager.proc, manager.log = successor.proc, successor.log
    assert "the datapath on wlan0 was built by another macnat version: replacing it" in successor.text()
    assert "adopting" not in successor.text()
    (fresh,) = json.loads(macnat("status", "--json").stdout)
    assert set(fresh["programs"].values()).isdisjoint(status["programs"].values()), "compiled and attached anew"
    for vm in (VM1, VM2):
        assert ping(vm.ns, lab.LANHOST.ip, count=3)
    assert set(leases.values()) <= set(table())
    assert ping(lab.LANHOST.ns, leases["vm2"], count=3)


def test_a_datapath_whose_tables_another_version_laid_out_is_taken_off_by_netlink(monkeypatch):
    """Its tables cannot even be read (another layout): what it attached is found by name and removed."""
    def other_layout(_ipr, _wifi):
        raise OtherBuild("map 'config' has key/value sizes 4/48, this macnat expects 4/52")

    removed = []
    monkeypatch.setattr(attachment, "find", other_layout)
    monkeypatch.setattr(attachment, "remove_other_build", lambda _ipr, wifi: removed.append(wifi))
    assert cli.adopt_or_load(None, "wlan0", "vmbr0", None, logging.getLogger("test")) is None
    assert removed == ["wlan0"]


def test_table_filters_and_per_vm_rows(attached):
    _, leases = attached
    rows = lambda *args: json.loads(macnat("table", "--json", *args).stdout)
    vm1_ipv4 = rows("--mac", VM1.mac.upper(), "--family", "ipv4")
    assert leases["vm1"] in {r["ip"] for r in vm1_ipv4}
    assert all(r["mac"] == VM1.mac and r["family"] == "ipv4" for r in vm1_ipv4)
    assert set(leases.values()) <= {r["ip"] for r in rows("--ip", "192.168.77.0/24")}
    assert all(r["ip"].startswith("192.168.77.") for r in rows("--ip", "192.168.77.0/24"))
    assert rows("--ip", leases["vm2"])[0]["mac"] == VM2.mac
    assert rows("--kind", "static") == []
    (vm1,) = [vm for vm in rows("--by-vm") if vm["mac"] == VM1.mac]
    assert leases["vm1"] in vm1["ipv4"] and vm1["tx_packets"] > 0 and vm1["wifi"] == "wlan0"
    human = macnat("table", "--by-vm").stdout
    assert VM1.mac in human and leases["vm1"] in human
    bad = macnat("table", "--family", "ipx", check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "macnat: error: --family takes ipv4 or ipv6, not 'ipx'"


def test_sigterm_detaches_and_leaves_nothing(attached):
    manager, leases = attached
    (status,) = json.loads(macnat("status", "--json").stdout)
    assert manager.stop(signal.SIGTERM) == 0
    assert macnat_objects() == {"filters": "", "clsact": False, "uplink": []}
    for prog_id in status["programs"].values():
        assert subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode != 0
    assert not lock_file().exists()
    assert lab.LAPTOP.ns.run("bridge", "fdb", "show", "br", "vmbr0").stdout.count("static") == 0
    assert macnat("status").stdout.strip() == "macnat is not attached in this network namespace"
    assert not ping(VM1.ns, lab.LANHOST.ip, timeout=1), "without macnat the AP drops the VM's frames again"

