"""Netlink through pyroute2: the interfaces macnat works with, the host's own addresses and routes,
the Wi-Fi's on-link prefixes and gateways, and bridge FDB entries. (The manager's event source, which
listens to changes, is in macnat.manager.sources.)"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NUD_NOARP, NUD_PERMANENT

NTF_STICKY = 0x40  # <linux/neighbour.h>; pyroute2 0.9 does not name it

from macnat.errors import MacnatError

RT_SCOPE_LINK = 253
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
NUD_INCOMPLETE, NUD_FAILED = 0x01, 0x20


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str
    kind: str | None       # "bridge", "veth", ...; None for plain devices
    master: int | None     # ifindex of the bridge it is a port of
    mtu: int
    up: bool = False       # administratively up
    carrier: bool = False  # the lower layer is up (for a station: associated)
    peer_elsewhere: bool = False  # a veth whose peer lives in another network namespace (a container, a VM's namespace)


def _link(msg) -> Link:
    flags = msg["flags"]
    return Link(index=msg["index"], name=msg.get("ifname"), mac=msg.get("address") or "",
                kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"), master=msg.get("master"),
                mtu=msg.get("mtu"), up=bool(flags & IFF_UP), carrier=bool(flags & IFF_LOWER_UP),
                peer_elsewhere=msg.get("IFLA_LINK_NETNSID") is not None)


def link_message(msg) -> Link:
    """A Link from an RTM_NEWLINK/RTM_DELLINK message (as the manager's event source receives them)."""
    return _link(msg)


def link(ipr: IPRoute, name: str) -> Link:
    found = find_link(ipr, name)
    if found is None:
        raise MacnatError(f"no interface named '{name}' in this network namespace")
    return found


def find_link(ipr: IPRoute, name: str) -> Link | None:
    """The interface called `name`, or None when there is none (yet)."""
    return next((lk for lk in links(ipr) if lk.name == name), None)


def link_by_index(ipr: IPRoute, index: int) -> Link | None:
    return next((lk for lk in links(ipr) if lk.index == index), None)


def links(ipr: IPRoute) -> list[Link]:
    """Every interface. One interface is looked up in this dump too: pyroute2 0.9.7 keeps about 1.6 KB
    for good after each RTM_GETLINK of one interface (measured: a manager calling it a few times a
    second grew by 8 MB an hour), a dump keeps nothing."""
    return [_link(msg) for msg in ipr.get_links()]


def bridge_ports(ipr: IPRoute, bridge_index: int) -> list[Link]:
    return [lk for lk in links(ipr) if lk.master == bridge_index]


def _address(msg) -> str:
    return msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")


def host_addresses(ipr: IPRoute) -> dict[str, str]:
    """Every IPv4 and IPv6 address of this host (all interfaces of the namespace) -> its interface."""
    names = {lk.index: lk.name for lk in links(ipr)}
    return {_address(msg): names.get(msg["index"], "?") for msg in ipr.get_addr()}


def interface_address(ipr: IPRoute, index: int, family: int, link_local: bool = False) -> str | None:
    """An address of the interface: IPv4 (AF_INET), or IPv6 (AF_INET6) of link or wider scope."""
    for msg in ipr.get_addr(family=family, index=index):
        if family == socket.AF_INET or (msg["scope"] == RT_SCOPE_LINK) == link_local:
            return _address(msg)
    return None


def ipv4_networks(ipr: IPRoute, index: int) -> set[ipaddress.IPv4Network]:
    """The IPv4 subnets the interface has addresses in."""
    return {ipaddress.IPv4Interface(f"{_address(msg)}/{msg['prefixlen']}").network
            for msg in ipr.get_addr(family=socket.AF_INET, index=index)}


def onlink_prefixes(ipr: IPRoute, index: int) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The prefixes on the link of an interface: those of its addresses, and its routes without a
    gateway in the main table (an on-link prefix from an RA, a `default dev wlan0`)."""
    found = {ipaddress.ip_interface(f"{_address(msg)}/{msg['prefixlen']}").network for msg in ipr.get_addr(index=index)}
    for family, any_address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if msg["type"] == RTN_UNICAST and msg.get("RTA_OIF") == index and not msg.get("RTA_GATEWAY") \
                    and not msg.get("RTA_MULTIPATH"):
                found.add(ipaddress.ip_network(f"{msg.get('RTA_DST') or any_address}/{msg['dst_len']}"))
    return found


def gateways(ipr: IPRoute, index: int) -> dict[str, str | None]:
    """The default gateways through an interface (main table) -> their MAC in the neighbour table, if known."""
    found: dict[str, str | None] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if msg["dst_len"] == 0 and msg.get("RTA_OIF") == index and msg.get("RTA_GATEWAY"):
                found[msg.get("RTA_GATEWAY")] = None
    if found:
        for msg in ipr.get_neighbours(ifindex=index):
            dst = msg.get("NDA_DST")
            if dst in found and msg.get("NDA_LLADDR") and not msg["state"] & (NUD_INCOMPLETE | NUD_FAILED):
                found[dst] = msg.get("NDA_LLADDR")
    return found


def default_gateway(ipr: IPRoute, index: int) -> str | None:
    """The IPv4 default gateway through the interface, if the main table has one."""
    return next((ip for ip in sorted(gateways(ipr, index)) if ":" not in ip), None)


NUD_RESOLVED = 0x02 | 0x04 | 0x08 | 0x10 | 0x80   # REACHABLE, STALE, DELAY, PROBE, PERMANENT


def neighbour_mac(ipr: IPRoute, index: int, ip: str) -> str | None:
    """The MAC the host's neighbour table holds for `ip` on the interface, if resolved."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for msg in ipr.get_neighbours(family=family, ifindex=index):
        if msg.get("NDA_DST") == ip and msg["state"] & NUD_RESOLVED and msg.get("NDA_LLADDR"):
            return msg.get("NDA_LLADDR")
    return None


def fdb_set(ipr: IPRoute, port: int, mac: str) -> None:
    """A static, sticky bridge FDB entry: frames to `mac` go to `port` only, and a frame from another port
    with `mac` as its source does not move it there (`bridge fdb replace ... master static sticky`; a
    static entry alone is moved by learning)."""
    ipr.fdb("replace", ifindex=port, lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER | NTF_STICKY)


def fdb_del(ipr: IPRoute, port: int, mac: str) -> None:
    with contextlib.suppress(NetlinkError):  # already gone (the port was removed, or the bridge dropped it)
        ipr.fdb("del", ifindex=port, lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER)


def fdb_static_macs(ipr: IPRoute, port: int) -> set[str]:
    return {msg.get("NDA_LLADDR") for msg in ipr.fdb("dump", ifindex=port)
            if msg["ifindex"] == port and msg["state"] & NUD_NOARP}


def fdb_macs(ipr: IPRoute, port: int) -> set[str]:
    """The MACs the bridge forwards to a port: learned and static entries (static ones move too when the
    MAC shows up behind another port), not the port's own permanent addresses."""
    return {msg.get("NDA_LLADDR") for msg in ipr.fdb("dump", ifindex=port)
            if msg["ifindex"] == port and msg.get("NDA_MASTER") and not msg["state"] & NUD_PERMANENT}
