"""What nl80211 (through pyroute2's IW) says about a Wi-Fi interface: its type, the network it is
associated with, 4-address mode, and whether its driver would allow 4-address mode on a station.

Used by the manager (which network it is on) and by `macnat doctor`. The parsing is separate from
the requests, so it can be tested with messages built by hand: the lab has no cfg80211.

pyroute2 0.9 declares NL80211_ATTR_4ADDR and NL80211_BSS_BSSID as 'hex' (decoded "01", "02:00:...")
and NL80211_ATTR_SSID as a string; the parsers accept what it decodes.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nl80211 import BSS_STATUS_NAMES, IFTYPE_NAMES, IFTYPE_VALUES, NL80211_NAMES, nl80211cmd

STATION = "station"


class Unavailable(Exception):
    """This kernel has no nl80211 family: no cfg80211 (no Wi-Fi driver; the lab; most VMs)."""


@dataclass(frozen=True)
class Interface:
    index: int
    name: str
    wiphy: int | None
    iftype: str            # "station", "ap", "monitor", ... (nl80211's names, lower case)
    use_4addr: bool
    ssid: str | None       # the network a station is connected to, where the kernel says it here


@dataclass(frozen=True)
class Bss:
    bssid: str
    frequency: int | None
    ssid: str | None = None    # from the BSS's information elements (what `iw dev wlan0 link` shows)


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parse_interface(msg) -> Interface:
    """An NL80211_CMD_NEW_INTERFACE message (the answer to GET_INTERFACE) as an Interface."""
    iftype = msg.get_attr("NL80211_ATTR_IFTYPE")
    four = msg.get_attr("NL80211_ATTR_4ADDR")
    return Interface(index=msg.get_attr("NL80211_ATTR_IFINDEX"), name=_text(msg.get_attr("NL80211_ATTR_IFNAME")),
                     wiphy=msg.get_attr("NL80211_ATTR_WIPHY"), iftype=IFTYPE_VALUES.get(iftype, f"type {iftype}"),
                     use_4addr=bool(four) and four.replace(":", "").strip("0") != "",
                     ssid=_text(msg.get_attr("NL80211_ATTR_SSID")) or None)


def parse_associated_bss(messages) -> Bss | None:
    """The BSS a station is associated with, from the answers to GET_SCAN (the scan cache holds it
    with NL80211_BSS_STATUS associated, beside other networks seen in the last scan)."""
    wanted = {BSS_STATUS_NAMES["associated"], BSS_STATUS_NAMES["ibss_joined"]}
    for msg in messages:
        bss = msg.get_attr("NL80211_ATTR_BSS")
        if bss is not None and bss.get_attr("NL80211_BSS_STATUS") in wanted:
            elements = bss.get_attr("NL80211_BSS_INFORMATION_ELEMENTS") or {}
            return Bss(bssid=_text(bss.get_attr("NL80211_BSS_BSSID")), frequency=bss.get_attr("NL80211_BSS_FREQUENCY"),
                       ssid=_text(elements.get("SSID")))
    return None


def network_name(iface: Interface | None, bss: Bss | None) -> str | None:
    """The SSID: GET_INTERFACE does not name a station's network on every kernel (commit 44905265bc15 left
    it out; the 6.1 kernel of the hwsim test sends none), the associated BSS's elements always do."""
    return (iface.ssid if iface else None) or (bss.ssid if bss else None)


def open_iw():
    """An IW socket; Unavailable when the kernel has no nl80211."""
    from pyroute2 import IW

    try:
        return IW()
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:  # the generic netlink family is not registered
            raise Unavailable("no nl80211 in this kernel (no cfg80211)") from None
        raise


def interface(iw, index: int) -> Interface | None:
    """The interface by index; None when nl80211 does not know it (not a Wi-Fi interface)."""
    try:
        found = iw.get_interface_by_ifindex(index)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return next((parse_interface(msg) for msg in found), None)


def interfaces(iw) -> list[Interface]:
    """Every Wi-Fi interface of this network namespace."""
    return [parse_interface(msg) for msg in iw.get_interfaces_dump()]


def associated_bss(iw, index: int) -> Bss | None:
    msg = nl80211cmd()
    msg["cmd"] = NL80211_NAMES["NL80211_CMD_GET_SCAN"]
    msg["attrs"] = [["NL80211_ATTR_IFINDEX", index]]
    return parse_associated_bss(iw.nlm_request(msg, msg_type=iw.prid))


def station_allows_4addr(iw, wiphy: int) -> bool:
    """Whether the driver of `wiphy` allows a station in 4-address mode.

    nl80211 does not report WIPHY_FLAG_4ADDR_STATION; it only checks it when asked for such an
    interface (nl80211_valid_4addr). So ask: a 4-address station interface is added to the radio,
    never brought up, and deleted at once. EOPNOTSUPP is the driver saying no; the association of
    the existing station is not touched.
    """
    msg = nl80211cmd()
    msg["cmd"] = NL80211_NAMES["NL80211_CMD_NEW_INTERFACE"]
    msg["attrs"] = [["NL80211_ATTR_WIPHY", wiphy], ["NL80211_ATTR_IFNAME", f"mn4a{os.getpid() % 0xFFFFF:x}"],
                    ["NL80211_ATTR_IFTYPE", IFTYPE_NAMES[STATION]], ["NL80211_ATTR_4ADDR", b"\x01"]]
    try:
        created = iw.nlm_request(msg, msg_type=iw.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
    except NetlinkError as exc:
        if exc.code == errno.EOPNOTSUPP:
            return False
        raise
    for answer in created:
        index = answer.get_attr("NL80211_ATTR_IFINDEX")
        if index:
            iw.del_interface(index)
    return True


def station_network(index: int) -> dict:
    """SSID, BSSID and frequency of the network the station `index` is associated with ({} if none)."""
    with open_iw() as iw:
        iface = interface(iw, index)
        bss = associated_bss(iw, index)
    if bss is None:
        return {}
    return {"ssid": network_name(iface, bss), "bssid": bss.bssid, "frequency": bss.frequency}
