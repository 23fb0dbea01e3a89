"""`macnat doctor` in one lab with macnat attached, run as a user runs it (`macnat doctor wlan0 vmbr0`
in the laptop's namespace): each fault seeded on it as a user would meet it, the finding and the exit
status asserted, and the fault taken away again. (Faults that need a lab of their own, and the
prerequisites, are in test_doctor_own_lab.py.)

The lab has no cfg80211, so every run carries one warning, `wifi-station` (no nl80211): a clean lab
exits 3, a warning-level fault still 3 (its finding is asserted), an error-level fault 4. The system
files doctor reads (systemd units, ifupdown2, NetworkManager) are seeded under a directory of the
test's own (MACNAT_DOCTOR_ROOT), the settings files under MACNAT_CONFIG_DIR: the machine's /etc is
never touched.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from doctortest import LAPTOP, UPLINK, assert_only, doctor, finding, system_root  # noqa: F401 (an autouse fixture)
from macnat import lab
from macnat.lab import MACNAT, RunningManager, ping
from macnat.plumbing import uplink_names
from test_attach import VM1, VM2, wait_for


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    """The lab with macnat attached, both VMs leased and each side having talked to the other."""
    lab.up()
    manager = RunningManager(log=tmp_path_factory.mktemp("doctor") / "manager.log")
    leases = lab.dhcp_all()
    assert all(leases.values()), leases
    assert ping(VM1.ns, lab.ROUTER.ip) and ping(VM2.ns, lab.LANHOST.ip) and ping(LAPTOP, lab.LANHOST.ip)
    assert ping(lab.LANHOST.ns, leases["vm1"])
    yield manager, leases
    manager.stop()
    lab.down()


CHECKS = {"root", "kernel-clsact", "kernel-cls-bpf", "kernel-test-run", "kernel-btf", "bcc", "kernel-headers",
          "config", "service", "attachment", "targets", "wifi", "wifi-station", "wifi-associated", "wifi-bridged",
          "bridge", "bridge-ports", "bridge-uplink", "bridge-address", "bridge-vlan", "daemons", "masquerade",
          "proxy-arp", "ifupdown2", "networkmanager", "ap-group-unicast", "ap-proxy-arp", "ap-isolation",
          "ap-arp-offload"}


def test_a_clean_lab_with_macnat_attached_has_no_error(attached):
    manager, _ = attached
    report, status = doctor("wlan0", "vmbr0")
    assert {f["id"] for f in report["findings"]} == CHECKS  # wifi-4addr needs nl80211, which the lab has not
    assert_only(report, status, 3)
    assert finding(report, "attachment")["details"]["manager_pid"] == manager.proc.pid
    assert f"{UPLINK} (macnat uplink)" in finding(report, "bridge-ports")["found"]
    assert finding(report, "ap-isolation")["details"]["answering"] == [lab.LANHOST.ip]
    text = subprocess.run(LAPTOP.exec_argv(MACNAT, "doctor"), capture_output=True, text=True)
    assert text.returncode == 3
    assert "wlan0 <-> vmbr0 (bridge from the attachment)" in text.stdout
    assert "see: docs/troubleshooting.md#no-nl80211" in text.stdout
    assert text.stdout.rstrip().endswith("1 warning (exit status 3)")


def test_parprouted_running(attached):
    LAPTOP.ip("link", "add", "pa0", "type", "veth", "peer", "name", "pa1")
    proc = LAPTOP.spawn("parprouted", "-d", "pa0", "pa1")
    try:
        assert wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "parprouted", timeout=5)
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 4, daemons="error")
        (daemon,) = finding(report, "daemons")["details"]["daemons"]
        assert (daemon["pid"], daemon["cmdline"]) == (proc.pid, "parprouted -d pa0 pa1")
    finally:
        proc.kill()
        proc.wait()
        LAPTOP.ip("link", "del", "pa0")


MASQUERADE = {
    "nft": ("nft", "add table ip natlab; add chain ip natlab post { type nat hook postrouting priority 100; }; "
                   "add rule ip natlab post oifname wlan0 ip saddr 10.10.10.0/24 masquerade", "nft delete table ip natlab"),
    "iptables-nft": ("iptables-nft", "-t nat -A POSTROUTING -s 10.10.10.0/24 -o wlan0 -j MASQUERADE",
                     "iptables-nft -t nat -F POSTROUTING"),  # seen through nftables, where its rules live
    "iptables-legacy": ("iptables-legacy", "-t nat -A POSTROUTING -s 10.10.10.0/24 -o wlan0 -j MASQUERADE",
                        "iptables-legacy -t nat -F POSTROUTING"),
}


@pytest.mark.parametrize("tool", MASQUERADE)
def test_a_masquerade_rule_for_the_vms(attached, tool):
    program, rule, undo = MASQUERADE[tool]
    LAPTOP.run(program, *([rule] if program == "nft" else rule.split()))
    try:
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3, masquerade="warning")
        nat = finding(report, "masquerade")
        (rule,) = nat["details"]["rules"]
        assert "10.10.10.0/24" in rule and rule.startswith("iptables-legacy: " if tool == "iptables-legacy" else "nft: ")
        LAPTOP.run(*nat["fix"].split("   #")[0].split())  # the fix given removes exactly that rule
        assert finding(doctor("wlan0", "vmbr0")[0], "masquerade")["verdict"] == "ok"
    finally:
        LAPTOP.run(*undo.split(), check=False)


@pytest.mark.parametrize("interface, verdict, status", [("vmbr0", "error", 4), ("wlan0", "warning", 3)])
def test_proxy_arp_set_on_the_host(attached, interface, verdict, status):
    LAPTOP.run("sysctl", "-qw", f"net.ipv4.conf.{interface}.proxy_arp=1")
    try:
        report, exit_status = doctor("wlan0", "vmbr0")
        assert_only(report, exit_status, status, proxy_arp=verdict)
        assert f"net.ipv4.conf.{interface}.proxy_arp=0" in finding(report, "proxy-arp")["fix"]
    finally:
        LAPTOP.run("sysctl", "-qw", f"net.ipv4.conf.{interface}.proxy_arp=0")


def test_a_bridge_with_an_address_and_a_dhcp_server(attached, tmp_path):
    LAPTOP.ip("addr", "add", "10.10.10.1/24", "dev", "vmbr0")
    try:
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3, bridge_address="warning")
        server = LAPTOP.spawn("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                              "--interface=vmbr0", "--bind-interfaces", "--dhcp-range=10.10.10.100,10.10.10.150",
                              f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'pid'}")
        try:
            assert wait_for(lambda: ":0043 " in LAPTOP.run("cat", "/proc/net/udp").stdout, timeout=5)
            report, status = doctor("wlan0", "vmbr0")
            assert_only(report, status, 4, bridge_address="error")
            assert finding(report, "bridge-address")["details"]["dhcp_servers"] == [f"dnsmasq (pid {server.pid})"]
        finally:
            server.kill()
            server.wait()
    finally:
        LAPTOP.ip("addr", "del", "10.10.10.1/24", "dev", "vmbr0")


INTERFACES = """# written by the Proxmox VE installer, then edited
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
"""


@pytest.mark.parametrize("stanza_options, system, verdict", [
    ("bridge-ports none", {}, "warning"),                                        # Debian, no ifupdown2 yet
    ("bridge-ports none", {"usr/sbin/ifreload"}, "error"),                       # Debian's ifupdown2
    ("bridge-ports none\n    bridge-ports-condone-regex ^(tap|fwpr)", {"usr/bin/pveversion"}, "error"),
    ("bridge-ports none", {"usr/bin/pveversion", "usr/sbin/ifreload"}, "ok"),    # Proxmox's default regex
    ("bridge-ports none\n    bridge-ports-condone-regex ^(tap|veth|fwpr)", {"usr/sbin/ifreload"}, "ok"),
    (f"bridge-ports {UPLINK}", {"usr/sbin/ifreload"}, "ok"),
], ids=["no-regex", "no-regex-ifupdown2", "regex-without-veth", "proxmox-default", "regex-with-veth", "listed"])
def test_an_ifupdown2_config_that_ifreload_would_use_to_remove_the_port(attached, system_root, stanza_options,
                                                                       system, verdict):
    (system_root / "etc/network/interfaces.d").mkdir(parents=True)
    (system_root / "etc/network/interfaces").write_text(INTERFACES)
    (system_root / "etc/network/interfaces.d/vmbr0").write_text(
        f"auto vmbr0\niface vmbr0 inet manual\n    {stanza_options}\n    bridge-stp off\n    bridge-fd 0\n")
    for path in system:
        (system_root / path).parent.mkdir(parents=True, exist_ok=True)
        (system_root / path).touch()
    report, status = doctor("wlan0", "vmbr0")
    found = finding(report, "ifupdown2")
    assert found["verdict"] == verdict, found
    assert_only(report, status, {"ok": 3, "warning": 3, "error": 4}[verdict],
                **({"ifupdown2": verdict} if verdict != "ok" else {}))
    if verdict != "ok":
        assert found["fix"].startswith(f"in {system_root}/etc/network/interfaces.d/vmbr0, iface vmbr0: "
                                       "bridge-ports-condone-regex ^(tap|veth|fwpr)")


def test_networkmanager_configured_to_manage_the_uplink(attached, system_root):
    conf = system_root / "etc/NetworkManager/conf.d"
    conf.mkdir(parents=True)
    (system_root / "etc/NetworkManager/NetworkManager.conf").write_text("[main]\nplugins=ifupdown,keyfile\n\n"
                                                                        "[keyfile]\nunmanaged-devices=interface-name:vethmn*\n")
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 3)
    assert "[keyfile] unmanaged-devices=interface-name:vethmn*" in finding(report, "networkmanager")["found"]
    (conf / "90-containers.conf").write_text("[device-containers]\nmatch-device=type:veth\nmanaged=1\n")
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 3, networkmanager="warning")
    nm = finding(report, "networkmanager")
    assert set(nm["details"]["managed"]) == set(uplink_names("wlan0"))
    assert f"{conf}/90-containers.conf [device-containers] managed=1" in nm["found"]
    assert nm["fix"].startswith(f"nmcli device set {UPLINK} managed no")


def test_an_access_point_that_answers_arp_for_its_stations(attached):
    _, leases = attached
    knobs = lab.knobs()
    lab.set_ap(lab.Knobs(**{**knobs.__dict__, "ap_proxy_arp": [lab.LAPTOP.ip, leases["vm1"]]}))
    try:
        LAPTOP.ip("neigh", "replace", leases["vm1"], "lladdr", VM1.mac, "dev", "wlan0", "nud", "stale")
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3, ap_proxy_arp="warning")
        assert finding(report, "ap-proxy-arp")["details"]["proxied"] == [lab.LAPTOP.ip, leases["vm1"]]
        assert lab.neighbours(LAPTOP)[leases["vm1"]] == VM1.mac, "the AP's answer did not stay in the host's table"
    finally:
        lab.set_ap(knobs)


def test_an_address_conflict_on_the_lan(attached):
    _, leases = attached
    lab.LANHOST.ns.ip("addr", "add", f"{leases['vm1']}/24", "dev", "eth0")  # a LAN host with a VM's address
    try:
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3, ap_proxy_arp="warning")
        conflict = finding(report, "ap-proxy-arp")
        assert conflict["details"]["conflicts"] == {leases["vm1"]: [lab.LANHOST.mac]}
        assert conflict["doc"] == "docs/troubleshooting.md#address-conflict"
    finally:
        lab.LANHOST.ns.ip("addr", "del", f"{leases['vm1']}/24", "dev", "eth0")


def test_an_access_point_that_isolates_its_clients(attached):
    knobs = lab.knobs()
    assert ping(LAPTOP, lab.LANHOST.ip)  # the host knows a LAN host
    lab.set_ap(lab.Knobs(**{**knobs.__dict__, "ap_isolation": True}))
    try:
        assert not ping(LAPTOP, lab.LANHOST.ip, timeout=1) and ping(VM1.ns, lab.ROUTER.ip)
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3, ap_isolation="warning")
        isolation = finding(report, "ap-isolation")
        assert isolation["details"]["silent"] == [lab.LANHOST.ip] and f"only the gateway {lab.GATEWAY}" in isolation["found"]
    finally:
        lab.set_ap(knobs)


def test_an_access_point_that_delivers_broadcasts_as_unicast(attached):
    knobs = lab.knobs()
    lab.set_ap(lab.Knobs(**{**knobs.__dict__, "mcast_to_ucast": True}))
    try:
        # The router asks for an address nobody has: its ARP broadcasts reach wlan0 as unicast.
        lab.ROUTER.ns.run("ping", "-c1", "-W2", "192.168.77.250", check=False)
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3)  # macnat repairs it: said, not a fault
        group = finding(report, "ap-group-unicast")
        assert group["details"]["group_restored"] >= 2 and "macnat restored" in group["found"]
    finally:
        lab.set_ap(knobs)


def test_wrong_names_are_errors_with_the_fix(attached):
    report, status = doctor("wlan9", "vmbr0")
    assert status == 4 and finding(report, "wifi")["verdict"] == "error"
    assert finding(report, "attachment")["verdict"] == "warning"  # nothing is attached to wlan9
    report, status = doctor("wlan0", "tap101")
    assert status == 4 and "tap101 is not a bridge (it is veth)" in finding(report, "bridge")["found"]
    assert "wlan0 is attached to vmbr0, not tap101" in finding(report, "attachment")["found"]


def test_a_bad_config_file_and_one_naming_another_bridge(attached, system_root):
    path = system_root / "etc/macnat/wlan0.toml"
    path.write_text('bridge = "vmbr0"\nage = -5\n')
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 4, config="error")
    assert finding(report, "config")["found"] == f"{path}: age must be a positive number of seconds, not -5"
    path.write_text('bridge = "vmbr1"\n')
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 3, config="warning")
    assert finding(report, "config")["fix"].startswith(f'bridge = "vmbr0" in {path}')
    report, _ = doctor()  # no arguments: the Wi-Fi interface and its bridge come from the file
    assert report["targets"] == [{"wifi": "wlan0", "bridge": "vmbr1", "bridge_from": "the config file"}]


UNIT = "[Unit]\nDescription=macnat on %i\n\n[Service]\nExecStart=/usr/bin/macnat attach %i\n\n[Install]\nWantedBy=multi-user.target\n"


def test_a_unit_enabled_without_config(attached, system_root):
    unit = system_root / "lib/systemd/system/macnat@.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(UNIT)
    wants = system_root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "macnat@wlan0.service").symlink_to("/lib/systemd/system/macnat@.service")
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 4, service="error")
    service = finding(report, "service")
    assert "macnat@wlan0 is enabled but" in service["found"] and "wlan0.toml does not exist" in service["found"]
    assert service["fix"].startswith("macnat config write wlan0 vmbr0")
    (system_root / "etc/macnat/wlan0.toml").write_text('age = 60\n')
    assert "sets no bridge" in finding(doctor("wlan0", "vmbr0")[0], "service")["found"]
    (system_root / "etc/macnat/wlan0.toml").write_text('bridge = "vmbr0"\n')
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 3)
    assert finding(report, "service")["details"]["enabled"] == ["wlan0"]
