"""Discovery multicast through macnat, a tested promise: mDNS, SSDP, LLMNR and WS-Discovery between a
LAN host and a VM, both ways, IPv4 and IPv6, with vmbr0's multicast snooping querying or not, with an
AP that turns multicast into unicast; the VMs' IGMP/MLD reports leave wlan0 as the station's own; and
a VM that answers an mDNS query (python-zeroconf, as Home Assistant uses) is reachable at the address
it announced."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest
from scapy.all import Ether
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from macnat import lab
from macnat.lab import RunningManager, ping
from nettest import capture
from test_attach import VM1, wait_for

# (name, IPv4 group, IPv6 group, port)
GROUPS = [("mDNS", "224.0.0.251", "ff02::fb", 5353), ("SSDP", "239.255.255.250", "ff02::c", 1900),
          ("LLMNR", "224.0.0.252", "ff02::1:3", 5355), ("WS-Discovery", "239.255.255.250", "ff02::c", 3702)]

LISTENER = textwrap.dedent("""
    import socket, struct, sys
    group, port, ifname, family = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if family == "4":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        mreqn = struct.pack("=4s4si", socket.inet_aton(group), socket.inet_aton("0.0.0.0"), socket.if_nametoindex(ifname))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                     socket.inet_pton(socket.AF_INET6, group) + struct.pack("=I", socket.if_nametoindex(ifname)))
    print("joined", flush=True)
    s.settimeout(float(sys.argv[5]))
    try:
        while True:
            data, sender = s.recvfrom(2048)
            print(data.decode(), sender[0], flush=True)
    except socket.timeout:
        pass
""")

SENDER = textwrap.dedent("""
    import socket, struct, sys, time
    group, port, ifname, family, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    if family == "4":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())  # SO_BINDTODEVICE
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        target = (group, port)
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(ifname))
        target = (group, port, 0, socket.if_nametoindex(ifname))
    for _ in range(5):
        s.sendto(text.encode(), target)
        time.sleep(0.2)
""")


def heard(receiver, sender, group: str, port: int, family: str, text: str, tmp_path) -> bool:
    """Whether a datagram `sender` sends to the group reaches a socket that joined it in `receiver`."""
    log = tmp_path / f"listen-{receiver.ns.name}-{port}-{family}.log"
    listener = receiver.ns.spawn(sys.executable, "-c", LISTENER, group, str(port), receiver.ifname, family, "1.5", log=log)
    try:
        assert wait_for(lambda: "joined" in log.read_text(), timeout=5)
        time.sleep(0.3)  # the join's report
        sender.ns.run(sys.executable, "-c", SENDER, group, str(port), sender.ifname, family, text)
        listener.wait(10)
    finally:
        listener.kill()
    return text in log.read_text()


@pytest.fixture(scope="module", params=["no-querier", "querier", "mcast-to-ucast"])
def multicast_lab(request, tmp_path_factory):
    lab.up(lab.Knobs(ipv6=True, mcast_to_ucast=request.param == "mcast-to-ucast"))
    lab.LAPTOP.ns.ip("link", "set", lab.BRIDGE, "type", "bridge", "mcast_snooping", "1",
                     "mcast_querier", "1" if request.param == "querier" else "0")
    manager = RunningManager(log=tmp_path_factory.mktemp("mcast") / "manager.log")
    lease = lab.dhcp("vm1")
    lab.wait_slaac("vm1")
    yield request.param, lease
    manager.stop()
    lab.down()


@pytest.mark.parametrize("name, group4, group6, port", GROUPS, ids=[g[0] for g in GROUPS])
def test_discovery_multicast_both_ways(multicast_lab, tmp_path, name, group4, group6, port):
    mode, _ = multicast_lab
    for family, group in (("4", group4), ("6", group6)):
        assert heard(VM1, lab.LANHOST, group, port, family, f"{name} to the VM", tmp_path), \
            f"{name} IPv{family} LAN host -> VM ({mode})"
        assert heard(lab.LANHOST, VM1, group, port, family, f"{name} from the VM", tmp_path), \
            f"{name} IPv{family} VM -> LAN host ({mode})"


def test_vm_membership_reports_leave_as_the_station(multicast_lab, tmp_path):
    """IGMP and MLD reports of a VM's joins reach the LAN with the station's MAC as their source."""
    with capture(lab.AP, "p-lanhost", "igmp or ip6", tmp=tmp_path) as frames:  # MLD sits behind a hop-by-hop header
        heard(VM1, lab.LANHOST, "224.0.0.251", 5353, "4", "join", tmp_path)
        heard(VM1, lab.LANHOST, "ff02::fb", 5353, "6", "join", tmp_path)
    igmp = [f for f in frames if IP in f and f[IP].proto == 2 and f[IP].src == lab.vm_ip("vm1")]
    mld = [f for f in frames if IPv6 in f and f[IPv6].src.startswith("fe80::5054") and f[IPv6].nh in (0, 58)]
    assert igmp and mld, frames
    assert {f[Ether].src for f in igmp + mld} == {lab.LAPTOP.mac}


ZEROCONF_VM = textwrap.dedent("""
    import socket, sys, time
    from zeroconf import ServiceInfo, Zeroconf, IPVersion
    ip = sys.argv[1]
    zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    zc.register_service(ServiceInfo("_http._tcp.local.", "macnat-vm1._http._tcp.local.",
                                    addresses=[socket.inet_aton(ip)], port=8080, server="macnat-vm1.local."))
    print("registered", flush=True)
    time.sleep(float(sys.argv[2]))
    zc.close()
""")

ZEROCONF_LAN = textwrap.dedent("""
    import socket, sys
    from zeroconf import Zeroconf, IPVersion
    zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
    info = zc.get_service_info("_http._tcp.local.", "macnat-vm1._http._tcp.local.", timeout=6000)
    print(socket.inet_ntoa(info.addresses[0]) if info else "none")
    zc.close()
""")


def test_a_vm_answering_mdns_is_reachable_at_the_address_it_announced(multicast_lab, tmp_path):
    mode, lease = multicast_lab
    log = tmp_path / "zeroconf-vm.log"
    responder = VM1.ns.spawn(sys.executable, "-c", ZEROCONF_VM, lease, "15", log=log)
    try:
        assert wait_for(lambda: "registered" in log.read_text(), timeout=15), log.read_text()
        found = lab.LANHOST.ns.run(sys.executable, "-c", ZEROCONF_LAN, lab.LANHOST.ip, timeout=30).stdout.strip()
        assert found == lease, f"the LAN host resolved macnat-vm1 to {found} ({mode})"
        assert ping(lab.LANHOST.ns, found)
    finally:
        responder.kill()
