"""A hostile VM in the lab (issue #12): vm2 tries each attack of the issue with frames built by scapy and
sent from its namespace (AF_PACKET), a LAN host forges what it can, and meanwhile vm1 keeps working
(lease, pings both ways), a new VM starts during a flood, and no LAN host's neighbour cache ever holds
a VM's MAC. tests/test_security.py has the same attacks packet by packet."""

from __future__ import annotations

import re
import threading
import time

import pytest
from scapy.all import ARP, BOOTP, DHCP, IP, UDP, Dot1AD, Dot1Q, Ether
from scapy.layers.inet6 import (ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptMTU,
                                ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop)

from macnat import lab
from macnat.plumbing import uplink_names
from macnat.lab import RunningManager, neighbours, ping
from macnat.maps import mac_bytes
from nettest import capture, send_frames
from test_attach import VM1, VM2, counters, table, wait_for

BROADCAST = "ff:ff:ff:ff:ff:ff"
ROUTER, LANHOST, LAPTOP = lab.ROUTER, lab.LANHOST, lab.LAPTOP
VM3_MAC = "52:54:00:00:01:03"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    lab.up(lab.Knobs(ipv6=True))
    manager = RunningManager(log=tmp_path_factory.mktemp("hostile") / "manager.log")
    leases = lab.dhcp_all()
    slaac = {vm: lab.wait_slaac(vm) for vm in lab.VMS}
    assert ping(LAPTOP.ns, ROUTER.ip), "the host knows its gateway: the manager pins it"
    assert wait_for(lambda: "on-link prefixes of wlan0" in manager.text(), timeout=5)
    yield manager, leases, slaac
    manager.stop()
    lab.down()


def vm_macs() -> set[str]:
    return {vm.mac for vm in lab.VMS.values()}


def lan_caches_hold_no_vm_mac() -> bool:
    return not vm_macs() & (set(neighbours(LANHOST.ns).values()) | set(neighbours(ROUTER.ns).values()))


def vm1_keeps_working(leases) -> None:
    assert ping(VM1.ns, LANHOST.ip) and ping(LANHOST.ns, leases["vm1"]), "vm1 <-> the LAN"
    assert ping(VM1.ns, LAPTOP.ip), "vm1 -> the host"
    assert lan_caches_hold_no_vm_mac()


def from_vm2(*frames) -> None:
    send_frames(VM2.ns, VM2.ifname, [bytes(f) for f in frames])


def repeatedly(send, seconds: float, every: float = 0.05) -> threading.Thread:
    """Keep sending in the background while the test looks at what the LAN sees."""
    def loop():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            send()
            time.sleep(every)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_vm_announcing_the_gateways_address_gets_none_of_its_traffic(hostile):
    """Was: the LAN host's neighbour entry for its gateway flipped to the laptop's MAC, and the impostor
    received 99 of 150 echo requests the LAN host sent to its gateway."""
    manager, leases, _ = hostile
    before = counters()["refused_lan_ip"]
    garp = [Ether(src=VM2.mac, dst=BROADCAST) / ARP(op=op, hwsrc=VM2.mac, psrc=lab.GATEWAY, pdst=lab.GATEWAY,
                                                   hwdst=BROADCAST if op == 2 else "00:00:00:00:00:00")
            for op in (1, 2)]
    with capture(VM2.ns, VM2.ifname, f"icmp and dst host {lab.GATEWAY}") as at_impostor:
        announcing = repeatedly(lambda: from_vm2(*garp), seconds=2.5)
        assert ping(LANHOST.ns, lab.GATEWAY, count=10), "every echo request reaches the gateway"
        announcing.join()
    assert at_impostor == []
    assert neighbours(LANHOST.ns)[lab.GATEWAY] == ROUTER.mac
    assert counters()["refused_lan_ip"] >= before + 20 and lab.GATEWAY not in table()
    assert wait_for(lambda: f"refused: VM {VM2.mac} claims {lab.GATEWAY}, an address the LAN uses" in manager.text(),
                    timeout=5)
    vm1_keeps_working(leases)


def fdb_ports(mac: str) -> set[str]:
    """The bridge ports vmbr0's FDB has for a MAC."""
    out = LAPTOP.ns.run("bridge", "fdb", "show", "br", lab.BRIDGE).stdout
    return {line.split()[2] for line in out.splitlines() if line.startswith(mac + " dev ")}


def test_a_vm_forging_the_gateways_the_wifis_or_another_vms_mac_changes_nothing(hostile):
    """Was: with the gateway's MAC the host's traffic for its gateway went into the bridge and the
    gateway's broadcasts stopped reaching the VMs; with wlan0's, VMs could not reach the host. The
    bridge learns from such a frame before macnat drops it: its entries for these MACs must not move."""
    _, leases, _ = hostile
    assert wait_for(lambda: fdb_ports(VM1.mac) == {lab.VM_PORTS["vm1"]}, timeout=3), "pinned by the manager"
    before = counters()
    from_vm2(Ether(src=ROUTER.mac, dst=LANHOST.mac) / IP(src=leases["vm2"], dst=LANHOST.ip) / UDP(sport=9, dport=9),
             Ether(src=ROUTER.mac, dst=BROADCAST) / ARP(op=1, hwsrc=ROUTER.mac, psrc=leases["vm2"], pdst=LANHOST.ip),
             Ether(src=LAPTOP.mac, dst=BROADCAST) / ARP(op=1, hwsrc=LAPTOP.mac, psrc=leases["vm2"], pdst=LANHOST.ip),
             Ether(src=VM1.mac, dst=LANHOST.mac) / IP(src=leases["vm2"], dst=LANHOST.ip) / UDP(sport=9, dport=9))
    after = counters()
    assert after["refused_mac_lan"] == before["refused_mac_lan"] + 2
    assert after["refused_mac_wifi"] == before["refused_mac_wifi"] + 1
    assert after["refused_mac_port"] == before["refused_mac_port"] + 1
    assert fdb_ports(ROUTER.mac) == fdb_ports(LAPTOP.mac) == {uplink_names(LAPTOP.ifname)[0]}
    assert fdb_ports(VM1.mac) == {lab.VM_PORTS["vm1"]}
    assert ping(LAPTOP.ns, ROUTER.ip), "the host still reaches its gateway"
    assert lab.dhcp("vm1") == leases["vm1"], "the gateway's broadcasts still reach the VMs"
    vm1_keeps_working(leases)


def test_a_vm_claiming_another_vms_address_does_not_get_it(hostile):
    """Was: a gratuitous ARP, or a single UDP datagram with a spoofed source, moved the address."""
    manager, leases, _ = hostile
    victim = leases["vm1"]
    from_vm2(Ether(src=VM2.mac, dst=BROADCAST) / ARP(op=1, hwsrc=VM2.mac, psrc=victim, pdst=victim),
             Ether(src=VM2.mac, dst=LANHOST.mac) / IP(src=victim, dst=LANHOST.ip) / UDP(sport=53, dport=53))
    assert table()[victim]["mac"] == VM1.mac
    assert wait_for(lambda: f"VM {VM2.mac} claims {victim}, which VM {VM1.mac} has and still answers for: kept"
                    in manager.text(), timeout=8), "the owner was probed and answered"
    assert table()[victim]["mac"] == VM1.mac
    vm1_keeps_working(leases)


def test_an_address_whose_owner_is_gone_moves_to_the_vm_that_claims_it(hostile):
    manager, leases, _ = hostile
    moving = "192.168.77.70"
    VM1.ns.ip("addr", "add", f"{moving}/24", "dev", VM1.ifname)
    assert VM1.ns.run("ping", "-c1", "-W2", "-I", moving, LANHOST.ip, check=False).returncode == 0
    assert table()[moving]["mac"] == VM1.mac
    VM1.ns.ip("addr", "del", f"{moving}/24", "dev", VM1.ifname)  # vm1 lets it go, without a word
    VM2.ns.ip("addr", "add", f"{moving}/24", "dev", VM2.ifname)
    try:
        vm2_reaches = lambda: VM2.ns.run("ping", "-c1", "-W1", "-I", moving, LANHOST.ip, check=False).returncode == 0
        assert wait_for(vm2_reaches, timeout=10, step=0.2)
        assert table()[moving]["mac"] == VM2.mac and ping(LANHOST.ns, moving)
        assert f"VM {VM2.mac} claims {moving} from VM {VM1.mac}, which did not answer its probe: released" \
            in manager.text()
    finally:
        VM2.ns.ip("addr", "del", f"{moving}/24", "dev", VM2.ifname)
    vm1_keeps_working(leases)


def test_ndp_tricks_never_put_a_vm_mac_in_the_lan_hosts_neighbour_cache(hostile):
    """Was: an NS or NA behind a hop-by-hop or destination options header, or with its link-layer
    option 9th or later, left with the VM's MAC inside, and a real LAN host stored it."""
    _, leases, slaac = hostile
    own = slaac["vm2"]
    assert ping(LANHOST.ns, own)  # the LAN host has an entry for it: at the station's MAC
    nine = [ICMPv6NDOptMTU(mtu=1500)] * 9
    na = lambda: ICMPv6ND_NA(tgt=own, R=0, S=0, O=1)  # unsolicited, override: it would replace the entry
    frames = [Ether(src=VM2.mac, dst="33:33:00:00:00:01") / IPv6(src=own, dst="ff02::1", hlim=255) / ext
              / na() / ICMPv6NDOptDstLLAddr(lladdr=VM2.mac)
              for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt())]
    options = nine[0]
    for option in nine[1:]:
        options = options / option
    frames.append(Ether(src=VM2.mac, dst="33:33:00:00:00:01") / IPv6(src=own, dst="ff02::1", hlim=255) / na()
                  / options / ICMPv6NDOptDstLLAddr(lladdr=VM2.mac))
    frames.append(Ether(src=VM2.mac, dst=LANHOST.mac) / IPv6(src=own, dst=LANHOST.ip6, hlim=255) / IPv6ExtHdrHopByHop()
                  / ICMPv6ND_NS(tgt=LANHOST.ip6) / options / ICMPv6NDOptSrcLLAddr(lladdr=VM2.mac))
    before = counters()["ndp_rewritten"]
    from_vm2(*frames)
    time.sleep(0.3)
    assert counters()["ndp_rewritten"] == before + len(frames)
    assert neighbours(LANHOST.ns)[own] == LAPTOP.mac
    assert lan_caches_hold_no_vm_mac()
    vm1_keeps_working(leases)


def test_a_forged_dhcpack_from_a_lan_host_moves_nothing(hostile):
    """Was: a forged broadcast DHCPACK from any LAN host moved one VM's address to another VM."""
    _, leases, _ = hostile
    before = counters()["dhcp_ack_unmatched"]
    ack = Ether(src=LANHOST.mac, dst=BROADCAST) / IP(src=LANHOST.ip, dst="255.255.255.255") / UDP(sport=67, dport=68) \
        / BOOTP(op=2, yiaddr=leases["vm1"], chaddr=mac_bytes(VM2.mac), xid=0x0BADF00D, flags=0x8000) \
        / DHCP(options=[("message-type", "ack"), ("server_id", LANHOST.ip), "end"])
    send_frames(LANHOST.ns, LANHOST.ifname, [bytes(ack)] * 3)
    time.sleep(0.2)
    assert counters()["dhcp_ack_unmatched"] == before + 3
    assert table()[leases["vm1"]]["mac"] == VM1.mac
    vm1_keeps_working(leases)


def test_odd_arp_and_tagged_frames_from_a_vm_never_reach_the_lan(hostile):
    """Was: ARP with any op was rewritten and learned from; 802.1Q/QinQ frames left with the outer source
    rewritten and the VM's MAC inside. (The VM port's receive moves the outer tag out of band, into
    skb->vlan_present, as a vlan-aware bridge does: this is that path; tests/test_security.py has the
    tags in the frame.)"""
    _, leases, _ = hostile
    before = counters()
    odd = [Ether(src=VM2.mac, dst=BROADCAST) / ARP(op=op, hwsrc=VM2.mac, psrc=leases["vm1"], pdst=LANHOST.ip)
           for op in (0, 3, 8, 25)]
    tagged = [Ether(src=VM2.mac, dst=BROADCAST) / Dot1Q(vlan=10) / ARP(op=1, hwsrc=VM2.mac, psrc=leases["vm2"]),
              Ether(src=VM2.mac, dst=BROADCAST) / Dot1AD(vlan=20) / Dot1Q(vlan=10) / ARP(op=1, hwsrc=VM2.mac)]
    with capture(LANHOST.ns, LANHOST.ifname, "arp or vlan") as seen:
        from_vm2(*odd, *tagged)
    after = counters()
    assert after["drop_malformed"] == before["drop_malformed"] + len(odd)
    assert after["drop_vlan"] == before["drop_vlan"] + len(tagged)
    assert not [p for p in seen if Dot1Q in p or (ARP in p and p[ARP].op not in (1, 2))]
    assert table()[leases["vm1"]]["mac"] == VM1.mac
    vm1_keeps_working(leases)


def flood() -> list[bytes]:
    """70,000 spoofed IPv6 sources (they filled `bindings` before) and 5,000 spoofed MACs (they filled
    `vm_macs`): one scapy frame each, its source bytes then varied."""
    v6 = bytearray(bytes(Ether(src=VM2.mac, dst=LANHOST.mac) / IPv6(src="fd77:77::", dst=LANHOST.ip6) / UDP()))
    frames = []
    for i in range(70_000):
        v6[22 + 12:22 + 16] = (0xAB000000 | i).to_bytes(4, "big")
        frames.append(bytes(v6))
    arp = bytearray(bytes(Ether(src=VM2.mac, dst=BROADCAST) / ARP(op=1, hwsrc=VM2.mac, psrc="0.0.0.0", pdst=LANHOST.ip)))
    for i in range(5_000):
        arp[6:12] = arp[22:28] = bytes([0x52, 0x54, 0xEE, 0, i >> 8, i & 0xFF])
        frames.append(bytes(arp))
    return frames


def test_a_flooding_vm_starves_nobody_and_a_new_vm_starts_meanwhile(hostile):
    """Was: one VM filled the tables and locked everyone else out: other VMs' new addresses, DHCPACKs and
    a newly started VM's first frame were dropped as table full."""
    manager, leases, _ = hostile
    before = counters()
    logged = len(manager.text().splitlines())
    frames = flood()
    sending = threading.Thread(target=send_frames, args=(VM2.ns, VM2.ifname, frames), daemon=True)
    vm3 = lab.add_vm("vm3", VM3_MAC, "tap103")
    try:
        sending.start()
        lease = lab.dhcp("vm3")
        assert lease and ping(LANHOST.ns, lease) and ping(vm3.ns, LANHOST.ip), "a VM started during the flood"
        vm1_keeps_working(leases)
        sending.join(60)
        after = counters()
        assert after["refused_limit_ipv6"] - before["refused_limit_ipv6"] >= 70_000 - 128
        assert after["refused_limit_macs"] - before["refused_limit_macs"] >= 5_000 - 32
        assert after["drop_table_full"] == before["drop_table_full"]
        rows = table()
        assert sum(r["mac"] == VM2.mac for r in rows.values()) <= 128 + 64
        assert rows[lease]["mac"] == VM3_MAC
        time.sleep(1.5)  # a sweep
        flood_lines = [ln for ln in manager.text().splitlines()[logged:] if re.search(r"tap102|52:54:ee", ln)]
        assert 1 <= len(flood_lines) <= 8, flood_lines  # rate-limited: a line per kind, not one per frame
    finally:
        lab.remove_vm("vm3")
    assert lan_caches_hold_no_vm_mac()


def test_a_vm_restarted_on_a_new_port_is_itself_again(hostile):
    """A port that goes away releases its MACs: the VM, back on a new tap with the same MAC, is not
    refused as coming from another port."""
    manager, _, _ = hostile
    lab.replug_vm("vm1", "tap111")
    assert wait_for(lambda: f"tap101 is gone: released its MACs {VM1.mac}" in manager.text(), timeout=5)
    lease = lab.dhcp("vm1")
    assert lease and ping(LANHOST.ns, lease) and ping(VM1.ns, LANHOST.ip)
    assert table()[lease]["mac"] == VM1.mac
    assert lan_caches_hold_no_vm_mac()
