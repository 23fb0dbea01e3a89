"""Netlink through pyroute2: the interfaces macnat works with, the host's own addresses, the Wi-Fi's
on-link prefixes and gateways, bridge FDB entries, and a watcher that says when addresses or links
changed."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NUD_NOARP

NTF_STICKY = 0x40  # <linux/neighbour.h>; pyroute2 0.9 does not name it

from macnat.errors import MacnatError

RT_SCOPE_LINK = 253
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


def _link(msg) -> Link:
    return Link(index=msg["index"], name=msg.get("ifname"), mac=msg.get("address") or "",
                kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"), master=msg.get("master"),
                mtu=msg.get("mtu"))


def link(ipr: IPRoute, name: str) -> Link:
    try:
        return _link(ipr.link("get", ifname=name)[0])
    except NetlinkError:
        raise MacnatError(f"no interface named '{name}' in this network namespace") from None


def link_by_index(ipr: IPRoute, index: int) -> Link | None:
    try:
        return _link(ipr.link("get", index=index)[0])
    except NetlinkError:
        return None


def links(ipr: IPRoute) -> list[Link]:
    return [_link(msg) for msg in ipr.get_links()]


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


def bridge_ports(ipr: IPRoute, bridge: int) -> dict[int, str]:
    """A bridge's ports: ifindex -> name."""
    return {lk.index: lk.name for lk in links(ipr) if lk.master == bridge}


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


class Watcher:
    """A netlink socket subscribed to link and address changes."""

    def __init__(self):
        self.ipr = IPRoute()
        self.ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)

    def wait(self, timeout: float, wake_fd: int) -> bool:
        """Wait up to `timeout` seconds, or until `wake_fd` is readable (a signal arrived).

        True when links or addresses changed; the pending messages are consumed.
        """
        changed = False
        fd = self.ipr.fileno()
        while True:
            ready = select.select([fd, wake_fd], [], [], 0 if changed else timeout)[0]
            if wake_fd in ready:
                os.read(wake_fd, 512)
                return changed
            if fd not in ready:
                return changed
            self.ipr.get()
            changed = True

    def close(self) -> None:
        self.ipr.close()
