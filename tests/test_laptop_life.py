"""A laptop's day, each event with one long-running `macnat attach` that nobody touches: the Wi-Fi
flaps, is unplugged and plugged again (a new ifindex), roams to another network with another MAC;
the uplink port is taken out of the bridge (by hand, and by Debian's real `ifreload -a`), deleted, or
the bridge is re-created. The VMs run dhcpcd, which asks again for a lease when its carrier comes
back, as a guest's network manager does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from macnat import lab
from macnat.lab import RunningManager, macnat, ping
from macnat.plumbing import uplink_names
from test_attach import VM1, VM2, table, wait_for

UPLINK, UPLINK_PEER = uplink_names(lab.LAPTOP.ifname)
NEW_MAC = "02:4d:4e:00:00:0b"
HOOKS = Path(__file__).resolve().parents[1] / "src/macnat/hooks"
PROXMOX_INTERFACES = """auto lo
iface lo inet loopback

auto vmbr0
iface vmbr0 inet manual
    bridge-ports none
    bridge-stp off
    bridge-fd 0
    bridge-ports-condone-regex {regex}
"""


@pytest.fixture
def day(tmp_path):
    """A lab with a second network to roam to, macnat attached, both VMs leased by dhcpcd."""
    lab.up(lab.Knobs(second_network=True))
    manager = RunningManager(log=tmp_path / "manager.log")
    for vm in lab.VMS:
        lab.start_dhcpcd(vm)
    leases = {vm: lab.wait_lease(vm) for vm in lab.VMS}
    assert ping(lab.LANHOST.ns, leases["vm1"]) and ping(lab.LANHOST.ns, leases["vm2"])
    yield manager, leases
    assert manager.stop() == 0, manager.text()
    lab.down()


def status() -> dict:
    (found,) = json.loads(macnat("status", "--json").stdout)
    return found


def reachable(ns, ip: str, timeout: float = 15) -> float | None:
    """Seconds until `ip` answers a ping from `ns` (None if it does not within `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ping(ns, ip, timeout=0.5):
            return time.monotonic() - start
    return None


def uplink_master() -> str | None:
    info = json.loads(lab.LAPTOP.ns.ip("-j", "link", "show", UPLINK))[0]
    return info.get("master")


def test_wifi_down_and_up(day):
    manager, leases = day
    lab.flap(down_seconds=1)
    assert reachable(lab.LANHOST.ns, leases["vm1"]) is not None
    assert ping(VM2.ns, lab.LANHOST.ip)
    assert "wlan0 lost its carrier" in manager.text() and "wlan0 has a carrier again" in manager.text()
    assert status()["state"] == "attached"


def test_wifi_down_longer_than_the_ageing_keeps_the_bindings(tmp_path):
    """Suspend-like: wlan0 down for longer than --age; nothing can refresh a binding meanwhile, so
    none expires, and the VMs are reachable again without asking for new leases."""
    lab.up()
    manager = RunningManager("--age", "3", log=tmp_path / "manager.log")
    try:
        leases = lab.dhcp_all()
        assert ping(lab.LANHOST.ns, leases["vm1"])
        lab.flap(down_seconds=7)
        assert {leases["vm1"], leases["vm2"]} <= set(table())
        assert reachable(lab.LANHOST.ns, leases["vm1"]) is not None
        assert "expired" not in manager.text()
    finally:
        manager.stop()
        lab.down()


def test_wifi_interface_replugged_is_re_attached_with_the_bindings(day):
    manager, leases = day
    before = status()
    lab.unplug()
    assert wait_for(lambda: "wlan0 is gone" in manager.text(), timeout=5)
    waiting = status()
    assert waiting["state"] == "waiting for wlan0", waiting
    assert waiting["manager_pid"] == manager.proc.pid
    assert leases["vm1"] in table(), "the bindings are kept while the Wi-Fi is away"
    counters_before = json.loads(macnat("stats", "--json").stdout)["wlan0"]
    assert ping(VM1.ns, lab.LANHOST.ip, timeout=1) is False  # nowhere to go meanwhile ...
    counters_after = json.loads(macnat("stats", "--json").stdout)["wlan0"]
    assert counters_after["vm_to_wifi"] == counters_before["vm_to_wifi"], "... and nothing redirected to a dead ifindex"

    lab.plug()
    recovered = reachable(lab.LANHOST.ns, leases["vm1"])
    assert recovered is not None and recovered < 5, recovered
    assert ping(VM2.ns, lab.LANHOST.ip)
    back = status()
    assert back["state"] == "attached" and back["programs"] == before["programs"], "the same programs, not compiled again"
    assert "wlan0 is back (ifindex" in manager.text() and "re-attached" in manager.text()


def test_roaming_to_another_network_with_another_mac_gets_the_vms_new_leases(day):
    manager, leases = day
    home_lanhost, away = lab.LANHOST, lab.NETWORKS["b"]
    lab.roam("b", NEW_MAC)
    new = {vm: lab.wait_lease(vm, "b", timeout=30) for vm in lab.VMS}
    assert all(ip.startswith(away.prefix4) for ip in new.values()), new
    assert reachable(away.lanhost.ns, new["vm1"]) is not None and ping(away.lanhost.ns, new["vm2"])
    assert ping(VM1.ns, away.lanhost.ip)
    assert lab.neighbours(away.lanhost.ns)[new["vm1"]] == NEW_MAC, "the new LAN sees the VMs at the new MAC"
    rows = table()
    assert not [ip for ip in rows if ip.startswith(home_lanhost.ip.rsplit(".", 1)[0])], "the old network's bindings are gone"
    text = manager.text()
    assert f"changed its MAC from {lab.LAPTOP.mac} to {NEW_MAC}" in text
    assert "new network: 192.168.88.0/24 via 192.168.88.1, was 192.168.77.0/24 via 192.168.77.1" in text
    assert "bouncing the carrier of tap101, tap102" in text
    assert status()["network"].startswith("192.168.88.0/24")


def test_roaming_moves_the_vms_ipv6_to_the_new_prefix(tmp_path):
    lab.up(lab.Knobs(second_network=True, ipv6=True))
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        for vm in lab.VMS:
            lab.start_dhcpcd(vm)
        home = lab.wait_slaac("vm1")
        assert ping(lab.LANHOST.ns, home)
        lab.roam("b", NEW_MAC)
        away = lab.wait_slaac("vm1")  # in the prefix of the network the laptop is on now
        assert away.startswith(lab.NETWORKS["b"].prefix6)
        assert reachable(lab.NETWORKS["b"].lanhost.ns, away) is not None
        assert home not in table(), "the old prefix's bindings are gone"
        assert lab.wait_lease("vm1", "b", timeout=30)
    finally:
        manager.stop()
        lab.down()


def test_uplink_taken_out_of_the_bridge_is_put_back_with_its_fdb_entries(day):
    manager, leases = day
    fdb = lambda: lab.LAPTOP.ns.run("bridge", "fdb", "show", "dev", UPLINK).stdout
    assert wait_for(lambda: lab.LANHOST.mac in fdb(), timeout=5)
    lab.LAPTOP.ns.ip("link", "set", UPLINK, "nomaster")
    assert wait_for(lambda: uplink_master() == lab.BRIDGE, timeout=3)
    assert wait_for(lambda: lab.LANHOST.mac in fdb() and lab.LAPTOP.mac in fdb(), timeout=3), fdb()
    assert ping(lab.LANHOST.ns, leases["vm1"]) and ping(VM2.ns, lab.LANHOST.ip)
    assert f"put {UPLINK} back into vmbr0" in manager.text()


def test_ifreload_with_proxmox_condone_regex_leaves_macnat_alone(day):
    manager, leases = day
    result = lab.ifreload(PROXMOX_INTERFACES.format(regex="^(tap|veth|fwpr)"))
    assert result.returncode == 0, result.stderr
    assert uplink_master() == lab.BRIDGE
    time.sleep(1.5)
    assert "put " not in manager.text(), "nothing had to be repaired"
    assert ping(lab.LANHOST.ns, leases["vm1"])


def test_ifreload_that_removes_the_uplink_is_repaired(day):
    manager, leases = day
    result = lab.ifreload(PROXMOX_INTERFACES.format(regex="^tap"))  # a user's regex without veth
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: f"put {UPLINK} back into vmbr0" in manager.text(), timeout=3), manager.text()
    assert uplink_master() == lab.BRIDGE
    assert reachable(lab.LANHOST.ns, leases["vm1"], timeout=5) is not None


def test_uplink_deleted_is_created_again(day):
    manager, leases = day
    lab.LAPTOP.ns.ip("link", "del", UPLINK)
    assert wait_for(lambda: f"re-created the uplink {UPLINK} in vmbr0" in manager.text(), timeout=3), manager.text()
    assert reachable(lab.LANHOST.ns, leases["vm1"], timeout=5) is not None
    assert ping(VM2.ns, lab.LANHOST.ip)


def test_bridge_deleted_and_created_again(day):
    manager, leases = day
    ns = lab.LAPTOP.ns
    ns.ip("link", "del", lab.BRIDGE)
    assert wait_for(lambda: "vmbr0 is gone" in manager.text(), timeout=3)
    assert status()["state"] == "waiting for vmbr0"
    ns.ip("link", "add", lab.BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    for port in lab.VM_PORTS.values():  # as the VM manager puts its taps back
        ns.ip("link", "set", port, "master", lab.BRIDGE)
    ns.ip("link", "set", lab.BRIDGE, "up")
    assert wait_for(lambda: uplink_master() == lab.BRIDGE, timeout=3)
    assert reachable(lab.LANHOST.ns, leases["vm1"], timeout=10) is not None
    assert ping(VM2.ns, lab.LANHOST.ip)
    assert status()["state"] == "attached"


def test_wifi_renamed_away_and_back(day):
    manager, leases = day
    ns = lab.LAPTOP.ns
    ns.ip("link", "set", "wlan0", "down")
    ns.ip("link", "set", "wlan0", "name", "wlx0011")
    assert wait_for(lambda: "wlan0 is renamed to wlx0011" in manager.text(), timeout=3), manager.text()
    assert "macnat" not in ns.run("tc", "filter", "show", "dev", "wlx0011", "ingress").stdout
    ns.ip("link", "set", "wlx0011", "name", "wlan0")
    ns.ip("link", "set", "wlan0", "up")
    ns.ip("route", "replace", "default", "via", lab.GATEWAY)
    assert reachable(lab.LANHOST.ns, leases["vm1"], timeout=5) is not None


def test_attach_waits_for_a_wifi_interface_that_is_not_there_yet(tmp_path):
    lab.up()
    lab.unplug()
    try:
        proc = macnat("attach", "wlan0", "vmbr0", check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == ("macnat: error: no interface named 'wlan0' in this network namespace "
                                       "(--wait waits for it to appear)")
        manager = RunningManager("--wait", log=tmp_path / "manager.log")
        try:
            assert status()["state"] == "waiting for wlan0"
            assert "waiting for wlan0" in manager.text()
            lab.plug()
            assert wait_for(lambda: status()["state"] == "attached", timeout=5)
            lease = lab.dhcp("vm1")
            assert lease and ping(lab.LANHOST.ns, lease)
        finally:
            assert manager.stop() == 0
    finally:
        lab.down()


@pytest.fixture
def fake_tools(tmp_path):
    """`qm` and `virsh` stand-ins on PATH that record how they were called."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "qm").write_text(f"""#!/bin/sh
echo "qm $*" >>{calls}
case "$1" in
  config) echo "boot: order=scsi0"; echo "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1" ;;
esac
""")
    (bin_dir / "virsh").write_text(f"""#!/bin/sh
echo "virsh $*" >>{calls}
case "$1" in
  list) echo "guest1" ;;
  domiflist) printf ' Interface   Type     Source   Model    MAC\\n---\\n vnet7       bridge   vmbr0    virtio   52:54:00:aa:bb:cc\\n' ;;
esac
""")
    for tool in ("qm", "virsh"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir, calls


@pytest.mark.parametrize("hook, port, expected", [
    ("proxmox-relink", "tap100i0", ["qm config 100",
                                   "qm set 100 --net0 virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,link_down=1",
                                   "qm set 100 --net0 virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"]),
    ("libvirt-relink", "vnet7", ["virsh list --name", "virsh domiflist guest1",
                                 "virsh domif-setlink guest1 vnet7 down", "virsh domif-setlink guest1 vnet7 up"]),
], ids=["proxmox", "libvirt"])
def test_new_network_runs_the_hook_for_qemu_taps(tmp_path, fake_tools, hook, port, expected):
    """QEMU taps do not pass a host-side carrier change to the guest: the hook relinks the guest's
    NIC through Proxmox (qm set ... link_down=1) or libvirt (virsh domif-setlink); veth ports are
    bounced by macnat itself."""
    bin_dir, calls = fake_tools
    lab.up(lab.Knobs(second_network=True))
    ns = lab.LAPTOP.ns
    ns.ip("tuntap", "add", port, "mode", "tap")
    ns.ip("link", "set", port, "master", lab.BRIDGE, "up")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MACNAT_RELINK_DOWN_SECONDS": "0.2"}
    config = tmp_path / "wlan0.toml"
    config.write_text(f'bridge = "vmbr0"\n[network_change]\naction = "bounce"\nhook = "{HOOKS / hook}"\n')
    log = tmp_path / "manager.log"
    proc = ns.spawn(lab.MACNAT, "attach", "wlan0", "--config", str(config), log=log, env=env)
    try:
        assert wait_for(lambda: "macnat: managing" in log.read_text(), timeout=30), log.read_text()
        lab.roam("b", NEW_MAC)
        assert wait_for(lambda: "the network-change hook exited" in log.read_text(), timeout=15), log.read_text()
        text = log.read_text()
        assert "bouncing the carrier of tap101, tap102" in text
        assert f"running {HOOKS / hook} for {port}" in text and "the network-change hook exited 0" in text
        assert calls.read_text().splitlines() == expected
    finally:
        proc.terminate()
        proc.wait(10)
        lab.down()


def test_a_wired_uplink_in_the_bridge_makes_macnat_step_aside(day):
    """Docked: the laptop's Ethernet in vmbr0 (an ifb device here, this kernel has no dummy; up, it has
    a carrier as a plugged cable has). Two ways to the LAN would loop through the AP, so macnat steps
    aside while it forwards and takes over again when the cable is out or the port leaves the bridge."""
    manager, leases = day
    ns = lab.LAPTOP.ns
    ns.ip("link", "add", "eno1", "type", "ifb")
    ns.ip("link", "set", "eno1", "master", lab.BRIDGE, "up")
    assert wait_for(lambda: status()["state"] == "stepped aside for eno1", timeout=3), status()
    assert "state DOWN" in ns.ip("link", "show", UPLINK)
    assert "vmbr0 has a wired uplink (eno1): macnat steps aside" in manager.text()
    ns.ip("link", "set", "eno1", "down")  # the cable pulled: no carrier
    assert wait_for(lambda: status()["state"] == "attached", timeout=3), status()
    assert reachable(lab.LANHOST.ns, leases["vm1"], timeout=5) is not None
    ns.ip("link", "set", "eno1", "up")
    assert wait_for(lambda: status()["state"].startswith("stepped aside"), timeout=3)
    ns.ip("link", "del", "eno1")  # undocked
    assert wait_for(lambda: status()["state"] == "attached", timeout=3)
    assert reachable(lab.LANHOST.ns, leases["vm1"], timeout=5) is not None and ping(VM2.ns, lab.LANHOST.ip)
    assert "the VMs are on the LAN through the Wi-Fi again" in manager.text()
