"""The lab is honest in both directions: plain bridging through a 3-address AP fails, and works
through a 4-address AP; the AP's drop counters say why."""

import json
import subprocess

from scapy.all import ARP, Ether

from macnat import lab
from macnat.netns import names
from macnat.lab import MACNAT, ping
from nettest import capture


def lab_processes() -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(lab.STATE_DIR) in line]


def test_cli_up_status_down_leaves_nothing():
    up = subprocess.run([MACNAT, "lab", "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    status = json.loads(subprocess.run([MACNAT, "lab", "status", "--json"], capture_output=True, text=True).stdout)
    assert status["up"] and status["laptop"]["wifi"] == "wlan0"
    assert len(lab_processes()) == 1  # dnsmasq
    down = subprocess.run([MACNAT, "lab", "down"], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not [n for n in names() if n.startswith(lab.PREFIX)]
    assert not lab_processes()
    assert not lab.STATE_DIR.exists()


def test_up_over_existing_lab_replaces_it(fresh_lab):
    assert lab.dhcp("vm1") is None  # leaves a dhclient attempt's files behind
    lab.up()
    assert lab.is_up()
    assert len(lab_processes()) == 1
    assert not (lab.STATE_DIR / "dhclient-vm1.leases").exists()


def test_wifi_station_reaches_the_lan(fresh_lab):
    assert ping(lab.LAPTOP.ns, lab.ROUTER.ip)
    assert ping(lab.LAPTOP.ns, lab.LANHOST.ip)
    assert lab.ap_drops() == {"from_unassociated": 0, "to_unassociated": 0, "chaddr_mismatch": 0}


def test_plain_bridging_through_the_ap_fails_and_the_ap_says_why(fresh_lab):
    lab.LAPTOP.ns.ip("link", "set", "wlan0", "master", lab.BRIDGE)
    leases = lab.dhcp_all()
    assert leases == {"vm1": None, "vm2": None}
    assert lab.ap_drops()["from_unassociated"] >= 2
    # Towards the station, unicast to a VM's MAC is dropped too.
    vm1 = lab.VMS["vm1"]
    lab.LANHOST.ns.ip("neigh", "replace", "192.168.77.151", "lladdr", vm1.mac, "dev", "eth0")
    assert not ping(lab.LANHOST.ns, "192.168.77.151", timeout=1)
    assert lab.ap_drops()["to_unassociated"] >= 1


def test_plain_bridging_works_with_a_4_address_ap(fresh_lab):
    lab.set_ap(lab.Knobs(ap_filter=False))
    lab.LAPTOP.ns.ip("link", "set", "wlan0", "master", lab.BRIDGE)
    leases = lab.dhcp_all()
    assert all(ip and ip.startswith("192.168.77.") for ip in leases.values()), leases
    assert len(set(leases.values())) == 2
    assert ping(lab.VMS["vm1"].ns, lab.LANHOST.ip)
    assert ping(lab.LANHOST.ns, leases["vm2"])


def test_ap_can_deliver_broadcast_as_unicast_to_the_station(fresh_lab):
    lab.set_ap(lab.Knobs(mcast_to_ucast=True))
    with capture(lab.LAPTOP.ns, "wlan0", "arp") as packets:
        lab.LANHOST.ns.run("ping", "-c1", "-W1", "192.168.77.99", check=False)
    requests = [p for p in packets if ARP in p and p[ARP].op == 1 and p[ARP].pdst == "192.168.77.99"]
    assert requests and all(p[Ether].dst == lab.LAPTOP.mac for p in requests)


def test_demo_shows_the_problem_and_macnat_fixing_it():
    demo = subprocess.run([MACNAT, "lab", "demo"], capture_output=True, text=True, timeout=120)
    try:
        assert demo.returncode == 0, demo.stdout + demo.stderr
        out = demo.stdout
        assert "✓ vm1 got no lease" in out and "frames from source MACs it has not associated" in out
        assert "leased 192.168.77." in out and "✓ ping LAN host -> vm2" in out
        assert "(SLAAC) and fd77:77::" in out and "✓ ping LAN host -> vm1 (fd77:77::" in out
        assert "Verdict: plain bridging fails through a Wi-Fi AP; with macnat the VMs are full hosts of the LAN" in out
        assert "✗" not in out
    finally:
        lab.down()
