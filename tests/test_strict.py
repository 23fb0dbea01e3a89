"""Strict networks in the lab (issue #13): an access point that drops the station's DHCP whose chaddr is
not the station's MAC (the lab's chaddr_check knob, an nft rule on the BOOTP chaddr), and the DHCPv4
policies against it, with real clients (isc dhclient without a client identifier, dhcpcd with its own)
and the lab's dnsmasq: keep fails there, rewrite and auto lease, several VMs at once, renewals,
rebinds and NAKs reach the right VM; what a server that takes a VM for the host, or ignores option 61,
does; and what of the VMs' non-IP frames reaches the LAN. The lease times measured are printed (pytest -s
shows them)."""

from __future__ import annotations

import json
import re
import time
import pytest
from scapy.all import Ether, Raw
from scapy.layers.eap import EAPOL
from scapy.layers.ppp import PPPoED

from macnat import lab
from macnat.lab import RunningManager, ping
from nettest import capture, send_frames
from test_attach import VM1, wait_for

VM2 = lab.VMS["vm2"]
STRICT = lab.Knobs(chaddr_check=True)
# dnsmasq's lease file names a client identifier as hex bytes; macnat's for a VM is type 1 and its MAC
MACNAT_CLIENT_ID = {vm.mac: "01:" + vm.mac for vm in (VM1, VM2)}


@pytest.fixture
def strict_lab():
    lab.up(STRICT)
    yield lab
    lab.down()


def attach(tmp_path, policy: str, name: str = "manager.log") -> RunningManager:
    return RunningManager("--dhcp", policy, log=tmp_path / name)


def timed_lease(vm: str, **options) -> tuple[str | None, float]:
    started = time.monotonic()
    ip = lab.dhcp(vm, **options)
    return ip, time.monotonic() - started


def test_keep_fails_on_an_ap_that_checks_chaddr_and_works_without_the_check(strict_lab, tmp_path):
    """The knob is honest: the AP drops the VMs' DHCP with their own chaddr (and counts it), and the
    same lab without the check leases."""
    manager = attach(tmp_path, "keep")
    try:
        assert lab.dhcp("vm1") is None
        assert lab.ap_drops()["chaddr_mismatch"] > 0
        lab.set_ap(lab.Knobs())
        ip, seconds = timed_lease("vm1")
        assert ip, "the same VM leases once the AP stops checking chaddr"
        print(f"\nkeep on a plain AP: lease in {seconds:.1f} s")
    finally:
        manager.stop()


def test_rewrite_leases_two_vms_at_once_each_with_its_own_address(strict_lab, tmp_path):
    """Both VMs' requests leave with the station's chaddr and their own client identifiers (macnat's,
    dhclient sends none): dnsmasq holds two leases for the one chaddr, and each reply reached its VM.
    dnsmasq picks an address from a hash of chaddr and reserves none it offers: when the two exchanges
    overlap, both are offered the same address, and the VM that requests it second gets a NAK (isc
    dhclient then retries its REQUEST until its timeout, and leases on its next DISCOVER)."""
    manager = attach(tmp_path, "rewrite")
    try:
        started = time.monotonic()
        leases = lab.dhcp_all()
        seconds = time.monotonic() - started
        assert all(leases.values()) and len(set(leases.values())) == 2, leases
        held = {entry["client_id"]: entry for entry in lab.server_leases()}
        for name, vm in (("vm1", VM1), ("vm2", VM2)):
            entry = held[MACNAT_CLIENT_ID[vm.mac]]
            assert (entry["ip"], entry["chaddr"]) == (leases[name], lab.LAPTOP.mac)
            assert ping(lab.LANHOST.ns, leases[name])
        table = {row["ip"]: row["mac"] for row in _table()}
        assert table[leases["vm1"]] == VM1.mac and table[leases["vm2"]] == VM2.mac
        assert lab.ap_drops()["chaddr_mismatch"] == 0
        naks = sum(lab.dhcp_log(vm).count("DHCPNAK") for vm in ("vm1", "vm2"))
        print(f"\nrewrite on a strict AP: both VMs leased in {seconds:.1f} s ({naks} NAKs on the way)")
    finally:
        manager.stop()


def _table() -> list[dict]:
    return json.loads(lab.macnat("table", "--json").stdout)


def test_renewals_and_rebinds_under_rewrite_reach_the_vm(strict_lab, tmp_path):
    """A renewal is unicast to the server and answered at the VM's address; a rebind (the server silent
    on unicast) is broadcast, answered at the VM's address too. dhclient takes an ACK only with its own
    chaddr, and says so ("DHCPACK of" after each request it sends)."""
    manager = attach(tmp_path, "rewrite")
    try:
        ip = lab.dhcp("vm1", renew_after=2, rebind_after=6, foreground=True)
        assert ip
        assert wait_for(lambda: len(taken(ip, "192.168.77.1")) >= 2, timeout=10), lab.dhcp_log("vm1")
        # the server's unicast is dropped: renewals fail, and at T2 the client rebinds by broadcast
        lab.AP.run("nft", "insert", "rule", "bridge", lab.AP_TABLE, "forward", "iifname", "air", "ip", "daddr",
                   lab.GATEWAY, "udp", "dport", "67", "counter", "drop")
        assert wait_for(lambda: taken(ip, "255.255.255.255")[1:], timeout=20), lab.dhcp_log("vm1")
        rule = lab.AP.run("nft", "list", "chain", "bridge", lab.AP_TABLE, "forward").stdout
        assert re.search(r'ip daddr 192\.168\.77\.1 udp dport 67 counter packets [1-9]', rule), rule
        requests = [line for line in lab.NETWORKS["a"].state_file("dnsmasq.log").read_text().splitlines()
                    if f"DHCPREQUEST(eth0) {ip} {lab.LAPTOP.mac}" in line]
        assert len(requests) >= 4, "the first, two renewals and a rebind, all with the station's chaddr"
        assert lab.vm_ip("vm1") == ip and ping(lab.LANHOST.ns, ip)
    finally:
        manager.stop()


def taken(ip: str, to: str) -> list[int]:
    """Where in vm1's dhclient output a DHCPREQUEST for `ip` sent to `to` was answered by an ACK it took:
    to the server, a renewal; to 255.255.255.255, the first request and then each rebind."""
    lines = lab.dhcp_log("vm1").splitlines()
    return [i for i, line in enumerate(lines[:-1])
            if line.startswith(f"DHCPREQUEST for {ip} on eth0 to {to} ") and lines[i + 1].startswith(f"DHCPACK of {ip} ")]


def test_a_nak_under_rewrite_reaches_the_vm_which_then_leases(strict_lab, tmp_path):
    """A VM asking for an address it may not have (an old lease from elsewhere, INIT-REBOOT) gets the
    server's DHCPNAK, broadcast with the station's chaddr, as its own; then it asks anew."""
    manager = attach(tmp_path, "rewrite")
    old = 'lease {\n  interface "eth0";\n  fixed-address 192.168.77.250;\n  option subnet-mask 255.255.255.0;\n' \
          '  option dhcp-server-identifier 192.168.77.1;\n  renew 4 2037/01/01 00:00:00;\n' \
          '  rebind 4 2037/01/01 00:00:00;\n  expire 4 2037/01/01 00:00:00;\n}\n'
    try:
        ip = lab.dhcp("vm1", lease=old)
        log = lab.dhcp_log("vm1")
        assert "DHCPREQUEST for 192.168.77.250" in log and "DHCPNAK from 192.168.77.1" in log, log
        assert ip and ip != "192.168.77.250"
    finally:
        manager.stop()


def test_dhcpcd_keeps_its_own_client_identifier_under_rewrite(strict_lab, tmp_path):
    """dhcpcd with `duid` (its own dhcpcd.conf's default) sends an RFC 4361 client identifier: it stays
    (the server's lease has it, macnat added none), and dhcpcd, which checks chaddr and the echoed
    identifier, takes the lease."""
    manager = attach(tmp_path, "rewrite")
    client = lab.start_dhcpcd("vm1", duid=True)
    try:
        ip = lab.wait_lease("vm1", timeout=30)
        entry = next(e for e in lab.server_leases() if e["ip"] == ip)
        assert entry["chaddr"] == lab.LAPTOP.mac and entry["client_id"].startswith("ff:"), entry
        stats = json.loads(lab.macnat("stats", "--json").stdout)["wlan0"]
        assert stats["dhcp_rewritten"] > 0 and stats["dhcp_client_id_added"] == 0, stats
        assert ping(lab.LANHOST.ns, ip)
    finally:
        client.kill()
        manager.stop()


def test_auto_switches_to_rewrite_on_a_strict_ap(strict_lab, tmp_path):
    """auto starts in keep; the VM's requests go unanswered while the server answers a DISCOVER macnat
    sends as the host; from then on chaddr is rewritten and the VM leases. The switch is logged and shown
    by macnat status; how long the VM waited is measured."""
    manager = attach(tmp_path, "auto")
    try:
        ip, seconds = timed_lease("vm1", timeout=20)
        assert ip and ping(lab.LANHOST.ns, ip)
        assert "DHCP (auto): rewriting the VMs' chaddr to wlan0's MAC from now on" in manager.text()
        assert "while the server answered a DHCPDISCOVER sent as this host" in manager.text()
        answered = re.compile(r"VM 52:54:00:00:01:01 got its answer about ([\d.]+) s")
        assert wait_for(lambda: answered.search(manager.text()), timeout=5), manager.text()  # auto looks every second
        waited = answered.search(manager.text())
        assert wait_for(lambda: "DHCP auto: rewrite since" in lab.macnat("status").stdout, timeout=8)  # rewritten every 5 s
        ip2, seconds2 = timed_lease("vm2")
        assert ip2, "a VM that comes later leases at once"
        print(f"\nauto on a strict AP: vm1 leased in {seconds:.1f} s (macnat: answered {waited[1]} s after its first "
              f"request), vm2 afterwards in {seconds2:.1f} s")
    finally:
        manager.stop()


def test_auto_on_a_plain_ap_keeps_keep(tmp_path):
    lab.up()
    manager = attach(tmp_path, "auto")
    try:
        ip, seconds = timed_lease("vm1")
        assert ip and lab.server_leases()[0]["chaddr"] == VM1.mac
        time.sleep(3)  # auto looks every second
        assert "DHCP auto: keep" in lab.macnat("status").stdout and "DHCP (auto)" not in manager.text()
        print(f"\nauto on a plain AP: lease in {seconds:.1f} s")
    finally:
        manager.stop()
        lab.down()


def host_lease_without_client_id() -> str:
    """The laptop's own DHCP client (isc dhclient on wlan0, no client identifier, as ifupdown runs it)
    takes a lease; its address."""
    conf = lab.STATE_DIR / "dhclient-host.conf"
    conf.write_text("timeout 8;\nretry 1;\ninitial-interval 1;\nrequest subnet-mask, routers;\n")
    lab.LAPTOP.ns.run("dhclient", "-1", "-cf", str(conf), "-sf", str(lab.STATE_DIR / "dhclient-script"),
                      "-pf", str(lab.STATE_DIR / "dhclient-host.pid"), "-lf", str(lab.STATE_DIR / "dhclient-host.leases"),
                      "wlan0", timeout=20)
    return next(e["ip"] for e in lab.server_leases() if e["chaddr"] == lab.LAPTOP.mac and e["client_id"] == "*")


def test_a_server_that_takes_a_vm_for_this_host_is_not_obeyed(strict_lab, tmp_path):
    """dnsmasq matches a lease without a client identifier by chaddr alone: this host's own lease (its
    DHCP client sends none) is what it offers a rewritten VM, which would take the host's address. macnat
    drops that offer (drop_dhcp_host_address): the VM gets no lease, the host keeps its own."""
    host_ip = host_lease_without_client_id()
    manager = attach(tmp_path, "rewrite")
    try:
        assert lab.dhcp("vm1") is None
        stats = lab.macnat("stats", "--json").stdout
        assert re.search(r'"drop_dhcp_host_address": [1-9]', stats), stats
        assert [e["ip"] for e in lab.server_leases() if e["chaddr"] == lab.LAPTOP.mac] == [host_ip]
        assert lab.vm_ip("vm1") is None
    finally:
        manager.stop()


@pytest.mark.parametrize("policy", ["keep", "auto"])
def test_a_server_holding_this_hosts_lease_by_chaddr_still_leases_to_kept_vms(policy, tmp_path):
    """The same server on a plain AP: with the VMs' own chaddr it has nothing to confuse, and auto,
    answered, stays with keep."""
    lab.up()
    host_ip = host_lease_without_client_id()
    manager = attach(tmp_path, policy)
    try:
        ip = lab.dhcp("vm1")
        assert ip and ip != host_ip and ping(lab.LANHOST.ns, ip)
    finally:
        manager.stop()
        lab.down()


def test_a_server_that_ignores_option_61_gives_every_vm_one_lease(tmp_path):
    """dnsmasq --dhcp-ignore-clid, as servers that ignore option 61 behave: under rewrite every VM is one
    client to it (the station's chaddr), and both VMs are handed the same address."""
    lab.up(lab.Knobs(chaddr_check=True, server_ignores_client_id=True))
    manager = attach(tmp_path, "rewrite")
    try:
        first = lab.dhcp("vm1")
        second = lab.dhcp("vm2")
        assert first and first == second
        assert len(lab.server_leases()) == 1
    finally:
        manager.stop()
        lab.down()


def test_vm_frames_of_other_ethertypes_never_reach_the_lan_but_one_vms_pppoe_does(tmp_path):
    """What a LAN host sees of VMs' non-IP frames: nothing of their LLDP, EAPOL or IPX (dropped and
    counted), one VM's PPPoE discovery as the station's, and nothing of a second VM's PPPoE while the
    first one's is active. vmbr0 forwards LLDP and 802.1X groups here (group_fwd_mask 0x4008, as set for
    VMs that run lldpd or an 802.1X supplicant): a default bridge keeps them itself."""
    lab.up()
    lab.LAPTOP.ns.ip("link", "set", lab.BRIDGE, "type", "bridge", "group_fwd_mask", "0x4008")
    manager = attach(tmp_path, "keep")
    vm1_frames = [
        bytes(Ether(src=VM1.mac, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(bytes(46))),   # LLDP
        bytes(Ether(src=VM1.mac, dst="01:80:c2:00:00:03") / EAPOL(version=2, type=1)),     # EAPOL-Start
        bytes(Ether(src=VM1.mac, dst=lab.ROUTER.mac) / EAPOL(version=2, type=3)),          # EAPOL-Key
        bytes(Ether(src=VM1.mac, dst="ff:ff:ff:ff:ff:ff", type=0x8137) / Raw(bytes(46))),   # IPX
        bytes(Ether(src=VM1.mac, dst="ff:ff:ff:ff:ff:ff") / PPPoED(code=0x09)),             # PADI
    ]
    try:
        with capture(lab.LANHOST.ns, lab.LANHOST.ifname, "not ip and not ip6 and not arp") as seen:
            send_frames(VM1.ns, VM1.ifname, vm1_frames)
            send_frames(VM2.ns, VM2.ifname, [bytes(Ether(src=VM2.mac, dst="ff:ff:ff:ff:ff:ff") / PPPoED(code=0x09))])
        assert [(p.src, p.type) for p in seen] == [(lab.LAPTOP.mac, 0x8863)], [p.summary() for p in seen]
        stats = json.loads(lab.macnat("stats", "--json").stdout)["wlan0"]
        counted = ("drop_link_local", "drop_station_control", "drop_ethertype", "refused_pppoe")
        assert {name: stats[name] for name in counted} == dict.fromkeys(counted, 1) | {"drop_link_local": 2}, stats
        refused = f"refused: PPPoE from VM {VM2.mac} on {lab.VM_PORTS['vm2']}: another VM's PPPoE is active (one VM at a time)"
        assert wait_for(lambda: refused in manager.text(), timeout=5), manager.text()
    finally:
        manager.stop()
        lab.down()


# What works, by access point behaviour and DHCP policy: README's table ("What your access point may
# still do to you") is this one. Each cell: how many addresses vm1 and vm2, leasing one after the other,
# got (2: one each; 1: the same one), whether vm1 reaches the gateway, whether a LAN host reaches vm1.
AP_BEHAVIOURS = {
    "plain": lab.Knobs(),
    "chaddr-check": lab.Knobs(chaddr_check=True),
    "server-ignores-option-61": lab.Knobs(server_ignores_client_id=True),
    "ap-isolation": lab.Knobs(ap_isolation=True),
    "arp-offload": lab.Knobs(arp_offload=True),
    "mcast-to-ucast": lab.Knobs(mcast_to_ucast=True),
}
POLICIES = ("keep", "rewrite", "auto")
WORKS = {  # (AP behaviour, policy) -> (addresses leased, vm1 -> gateway, LAN host -> vm1)
    **{(ap, policy): (2, True, True) for ap in ("plain", "mcast-to-ucast") for policy in POLICIES},
    ("chaddr-check", "keep"): (0, False, False),
    ("chaddr-check", "rewrite"): (2, True, True),
    ("chaddr-check", "auto"): (2, True, True),
    # one client to the server under rewrite: vm2 is handed vm1's address, whose binding moves to vm2
    ("server-ignores-option-61", "keep"): (2, True, True),
    ("server-ignores-option-61", "rewrite"): (1, False, True),
    ("server-ignores-option-61", "auto"): (2, True, True),
    # isolation: the station talks to the router only, as any two stations do; ARP offload: the
    # firmware keeps every ARP not for the host's own address from it, the gateway's answers to a VM too
    **{("ap-isolation", policy): (2, True, False) for policy in POLICIES},
    **{("arp-offload", policy): (2, False, False) for policy in POLICIES},
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ap", list(AP_BEHAVIOURS))
def test_what_works_by_access_point_and_dhcp_policy(ap, policy, tmp_path):
    lab.up(AP_BEHAVIOURS[ap])
    manager = attach(tmp_path, policy)
    try:
        (ip, seconds), (ip2, seconds2) = timed_lease("vm1", timeout=20), timed_lease("vm2", timeout=20)
        outcome = (len({ip, ip2} - {None}), bool(ip) and ping(VM1.ns, lab.GATEWAY, timeout=1),
                   bool(ip) and ping(lab.LANHOST.ns, ip, timeout=1))
        leases = ", ".join(f"{vm} {f'{address} in {took:.1f} s' if address else 'none in 20 s'}"
                           for vm, address, took in (("vm1", ip, seconds), ("vm2", ip2, seconds2)))
        print(f"\n{ap} x dhcp = {policy}: {leases}; vm1 -> gateway {outcome[1]}, LAN host -> vm1 {outcome[2]}")
        assert outcome == WORKS[ap, policy]
    finally:
        manager.stop()
        lab.down()
