"""Where events come from: rtnetlink, nl80211 and signals, each a file descriptor the loop polls."""

from __future__ import annotations

import logging
import os
import signal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE,
                                   RTMGRP_LINK, RTMGRP_TC)

from macnat import netlink
from macnat.manager import events

log = logging.getLogger("macnat")
RT_TABLE_MAIN = 254


class Rtnetlink:
    """Link, address, main-table route and tc changes in this network namespace."""

    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_TC

    def __init__(self):
        self.ipr = IPRoute()
        self.ipr.bind(groups=self.GROUPS)

    def fileno(self) -> int:
        return self.ipr.fileno()

    def read(self) -> list:
        found = []
        for msg in self.ipr.get():
            event = self._event(msg)
            if event is not None:
                found.append(event)
        return found

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
        if kind in ("RTM_NEWQDISC", "RTM_DELQDISC", "RTM_NEWTFILTER", "RTM_DELTFILTER"):
            return events.FiltersChanged(msg["index"])
        return None

    def close(self) -> None:
        self.ipr.close()


class Nl80211:
    """The station's connects, roams and disconnects (nl80211's "mlme" group).

    NetworkManager reports no roams and wpa_cli only network changes; the kernel reports them all.
    On a machine without cfg80211 (the lab) there is no nl80211 family: available() is False there.
    """

    COMMANDS = {"NL80211_CMD_CONNECT": "connect", "NL80211_CMD_ROAM": "roam", "NL80211_CMD_DISCONNECT": "disconnect"}

    def __init__(self):
        from pyroute2 import IW

        self.iw = IW()
        self.iw.add_membership("mlme")

    @classmethod
    def available(cls) -> Nl80211 | None:
        try:
            return cls()
        except (NetlinkError, OSError, KeyError) as exc:
            log.debug("no nl80211 events (%s): following the Wi-Fi by rtnetlink alone", exc)
            return None

    def fileno(self) -> int:
        return self.iw.fileno()

    def read(self) -> list:
        found = []
        for msg in self.iw.get():
            kind = self.COMMANDS.get(msg.get("event"))
            if kind:
                bssid = msg.get_attr("NL80211_ATTR_MAC")
                found.append(events.WifiAssociation(msg.get_attr("NL80211_ATTR_IFINDEX"), kind, bssid))
        return found

    def close(self) -> None:
        self.iw.close()


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

