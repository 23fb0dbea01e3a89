"""IPv6 for VMs behind macnat, in the lab with RA (SLAAC) and DHCPv6 from dnsmasq, through the CLI."""

from __future__ import annotations

import json

import pytest

from macnat import lab
from macnat.lab import RunningManager, neighbours, ping
from nettest import tcp_transfer
from test_attach import VM1, VM2, counters, table, wait_for


def laptop_ip6() -> str:
    out = json.loads(lab.LAPTOP.ns.ip("-j", "-6", "addr", "show", "dev", "wlan0", "scope", "global"))
    return next(i["local"] for link in out for i in link["addr_info"] if "local" in i)


def link_local(ns, ifname: str) -> str:
    out = json.loads(ns.ip("-j", "-6", "addr", "show", "dev", ifname, "scope", "link"))
    return next(i["local"] for link in out for i in link["addr_info"] if "local" in i)


@pytest.fixture(scope="module")
def v6(tmp_path_factory):
    lab.up(lab.Knobs(ipv6=True))
    manager = RunningManager(log=tmp_path_factory.mktemp("ipv6") / "manager.log")
    leases4 = lab.dhcp_all()
    slaac = {vm: lab.wait_slaac(vm) for vm in lab.VMS}
    dhcp6 = {vm: lab.dhcp6(vm) for vm in lab.VMS}
    yield manager, leases4, slaac, dhcp6
    manager.stop()  # SIGTERM, as a user stops it: the manager detaches and removes its lock file
    lab.down()


def test_vms_get_slaac_and_dhcpv6_addresses_with_their_own_duids(v6):
    _, _, slaac, dhcp6 = v6
    for vm in lab.VMS:
        assert slaac[vm].startswith(lab.IPV6_PREFIX) and dhcp6[vm] and dhcp6[vm].startswith(lab.IPV6_PREFIX)
    # dnsmasq's lease file: "<expiry> <iaid> <address> <hostname> <client DUID>" for DHCPv6 leases
    records = [line.split() for line in (lab.STATE_DIR / "dnsmasq.leases").read_text().splitlines()]
    duid_of = {fields[2]: fields[4] for fields in records if len(fields) == 5}
    for vm, host in lab.VMS.items():
        assert duid_of[dhcp6[vm]] == "00:03:00:01:" + host.mac  # DUID-LL (type 3, Ethernet): the VM's own MAC


def test_ping6_in_every_direction(v6):
    _, _, slaac, dhcp6 = v6
    assert ping(VM1.ns, lab.LANHOST.ip6), "VM -> LAN host"
    assert ping(lab.LANHOST.ns, slaac["vm1"]) and ping(lab.LANHOST.ns, dhcp6["vm2"]), "LAN host -> VM"
    assert ping(lab.LAPTOP.ns, slaac["vm2"]), "host -> VM"
    assert ping(VM2.ns, laptop_ip6()), "VM -> host"
    assert ping(VM1.ns, dhcp6["vm2"]), "VM -> VM"
    assert ping(VM1.ns, f"{link_local(lab.ROUTER.ns, 'eth0')}%eth0"), "VM -> router, link-local"
    assert lab.ap_drops() == {"from_unassociated": 0, "to_unassociated": 0, "chaddr_mismatch": 0}


def test_lan_sees_the_vms_ipv6_addresses_at_the_stations_mac(v6):
    _, _, slaac, dhcp6 = v6
    for ip in (slaac["vm1"], dhcp6["vm1"], slaac["vm2"]):
        assert ping(lab.LANHOST.ns, ip)
    seen = neighbours(lab.LANHOST.ns)
    assert seen[slaac["vm1"]] == seen[dhcp6["vm1"]] == seen[slaac["vm2"]] == lab.LAPTOP.mac
    assert counters()["ndp_rewritten"] > 0


def test_tcp_over_ipv6_both_ways(v6):
    up = tcp_transfer(lab.LANHOST.ns, lab.LANHOST.ip6, VM1.ns)
    down = tcp_transfer(lab.LANHOST.ns, lab.LANHOST.ip6, VM1.ns, reverse=True)
    assert up > 100e6 and down > 100e6, (up, down)


def test_ipv4_keeps_working_alongside(v6):
    _, leases4, _, _ = v6
    assert ping(VM1.ns, lab.LANHOST.ip) and ping(lab.LANHOST.ns, leases4["vm2"])


def test_table_lists_ipv6_bindings(v6):
    _, leases4, slaac, dhcp6 = v6
    rows = table()
    for vm, host in lab.VMS.items():
        for ip in (slaac[vm], dhcp6[vm]):
            assert rows[ip]["family"] == "ipv6" and rows[ip]["mac"] == host.mac
        assert rows[leases4[vm]]["family"] == "ipv4"
    assert any(ip.startswith("fe80::") and row["mac"] == VM1.mac for ip, row in rows.items()), "link-local learned"


def test_a_vm_claiming_the_hosts_ipv6_address_is_refused(v6):
    manager = v6[0]
    taken = laptop_ip6()
    VM2.ns.ip("-6", "addr", "add", f"{taken}/128", "dev", "eth0", "nodad")
    try:
        VM2.ns.run("ping", "-c1", "-W1", "-I", taken, lab.LANHOST.ip6, check=False)
        assert counters()["refused_host_ip"] >= 1
        assert wait_for(lambda: f"claims {taken}, an address of this host (wlan0)" in manager.text(), timeout=5)
        assert taken not in table()
    finally:
        VM2.ns.ip("-6", "addr", "del", f"{taken}/128", "dev", "eth0")


def test_a_lan_host_cannot_take_a_vms_address(v6):
    """The LAN host's DAD probe drops the binding; VM1 defends the address, is bound again, and the
    LAN host's DAD fails, as it would on a wire."""
    _, _, slaac, _ = v6
    before = counters()["dad_conflict"]
    lab.LANHOST.ns.ip("-6", "addr", "add", f"{slaac['vm1']}/64", "dev", "eth0")
    try:
        assert wait_for(lambda: "dadfailed" in lab.LANHOST.ns.ip("-6", "addr", "show", "to", slaac["vm1"]), timeout=5)
        assert counters()["dad_conflict"] == before + 1
        assert wait_for(lambda: table().get(slaac["vm1"], {}).get("mac") == VM1.mac, timeout=3)
        assert ping(lab.LAPTOP.ns, slaac["vm1"])
    finally:
        lab.LANHOST.ns.ip("-6", "addr", "del", f"{slaac['vm1']}/64", "dev", "eth0")
