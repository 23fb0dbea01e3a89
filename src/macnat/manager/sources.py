"""Where events come from: rtnetlink, nl80211 and signals, each a file descriptor the loop polls.

The netlink sources read their sockets themselves and let pyroute2 only decode the messages:
pyroute2's own get() hands out one message per call and keeps the rest of a datagram in a queue of
its own, which a poll on the socket never sees (a rename following a link-down would wait for the
next event).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nl80211 import nl80211cmd
from pyroute2.netlink.rtnl import (RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE,
                                   RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_TC)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from macnat import netlink
from macnat.manager import events

log = logging.getLogger("macnat")
RT_TABLE_MAIN = 254
NETLINK_GENERIC = 16   # linux/netlink.h; Python's socket module names only some protocols
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
RECEIVE_BUFFER = 4 << 20   # bursts (a bridge re-created with many ports) must not overflow it
NLMSG_HEADER = struct.Struct("=IHHII")


class NetlinkSource:
    """A non-blocking netlink socket subscribed to multicast groups; read() returns events."""

    def __init__(self, protocol: int, groups: int = 0):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  protocol)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.sock.bind((0, groups))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list:
        found = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return found
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                log.warning("netlink events were lost (the socket overflowed): checking everything again")
                found.append(events.Overrun())
                continue
            found += self.decode(data)

    def decode(self, data: bytes) -> list:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class Rtnetlink(NetlinkSource):
    """Link, address, main-table route, IP neighbour and tc changes in this network namespace."""

    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_TC \
        | RTMGRP_NEIGH

    def __init__(self):
        super().__init__(socket.NETLINK_ROUTE, self.GROUPS)
        self.marshal = MarshalRtnl()

    def decode(self, data: bytes) -> list:
        return [e for e in map(self._event, self.marshal.parse(data)) if e is not None]

    @staticmethod
    def _event(msg):
        kind = msg.get("event")
        if kind in ("RTM_NEWLINK", "RTM_DELLINK"):
            return events.LinkChanged(netlink.link_message(msg), removed=kind == "RTM_DELLINK")
        if kind in ("RTM_NEWADDR", "RTM_DELADDR"):
            return events.AddressChanged(msg["index"], msg["family"], msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"),
                                         removed=kind == "RTM_DELADDR")
        if kind in ("RTM_NEWROUTE", "RTM_DELROUTE") and msg.get("table") == RT_TABLE_MAIN:
            return events.RouteChanged(msg["family"], removed=kind == "RTM_DELROUTE")
        if kind in ("RTM_NEWNEIGH", "RTM_DELNEIGH") and msg["family"] in (socket.AF_INET, socket.AF_INET6):
            # the group also carries every bridge FDB change (AF_BRIDGE): not a neighbour of this host
            return events.NeighbourChanged(msg["ifindex"], msg.get("NDA_DST"), removed=kind == "RTM_DELNEIGH")
        if kind in ("RTM_NEWQDISC", "RTM_DELQDISC", "RTM_NEWTFILTER", "RTM_DELTFILTER"):
            return events.FiltersChanged(msg["index"])
        return None


class Nl80211(NetlinkSource):
    """The station's connects, roams and disconnects (nl80211's "mlme" group).

    NetworkManager reports no roams and wpa_cli only network changes; the kernel reports them all.
    On a machine without cfg80211 (the lab) there is no nl80211 family: available() is None there.
    """

    COMMANDS = {"NL80211_CMD_CONNECT": "connect", "NL80211_CMD_ROAM": "roam", "NL80211_CMD_DISCONNECT": "disconnect"}

    def __init__(self):
        from pyroute2 import NL80211

        with NL80211() as resolver:  # the family's and the group's numbers
            resolver.bind()
            self.family, group = resolver.prid, resolver.mcast_groups["mlme"]
        super().__init__(NETLINK_GENERIC)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    @classmethod
    def available(cls) -> Nl80211 | None:
        try:
            return cls()
        except (NetlinkError, OSError, KeyError) as exc:
            log.debug("no nl80211 events (%s): following the Wi-Fi by rtnetlink alone", exc)
            return None

    def decode(self, data: bytes) -> list:
        found, offset = [], 0
        while offset + NLMSG_HEADER.size <= len(data):
            length, kind = NLMSG_HEADER.unpack_from(data, offset)[:2]
            if length < NLMSG_HEADER.size:
                break
            if kind == self.family:
                msg = nl80211cmd(data[offset:offset + length])
                msg.decode()
                name = next((n for n, v in NL80211_COMMANDS.items() if v == msg["cmd"]), None)
                if name in self.COMMANDS:
                    found.append(events.WifiAssociation(msg.get_attr("NL80211_ATTR_IFINDEX"), self.COMMANDS[name],
                                                        msg.get_attr("NL80211_ATTR_MAC")))
            offset += (length + 3) & ~3
        return found


def _nl80211_commands() -> dict[str, int]:
    from pyroute2.netlink import nl80211

    return {name: getattr(nl80211, name) for name in Nl80211.COMMANDS}


NL80211_COMMANDS = _nl80211_commands()


class Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload) as events, through a wake-up pipe."""

    EVENTS = {signal.SIGTERM: events.Stopping, signal.SIGINT: events.Stopping, signal.SIGHUP: events.ReloadRequested}

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        os.set_blocking(self.read_fd, False)
        self.previous = {sig: signal.signal(sig, lambda *_: None) for sig in self.EVENTS}
        self.previous_wakeup = signal.set_wakeup_fd(self.write_fd)

    def fileno(self) -> int:
        return self.read_fd

    def read(self) -> list:
        try:
            data = os.read(self.read_fd, 512)
        except BlockingIOError:
            return []
        return [self.EVENTS[sig]() for sig in data if sig in self.EVENTS]

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous_wakeup)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self.read_fd)
        os.close(self.write_fd)

