"""What can happen to a running attachment, as the manager's loop hands it to the duties.

Events from outside come from macnat.manager.sources (rtnetlink, nl80211, signals); the loop adds
Started, Reloaded and Stopping. Duties post the derived events at the end (a duty never calls another
duty: it says what it did, and the others react).
"""

from __future__ import annotations

from dataclasses import dataclass

from macnat.config import Settings
from macnat.netlink import Link


@dataclass(frozen=True)
class Started:
    """The manager runs: every duty brings the kernel in line with its view of things."""


@dataclass(frozen=True)
class Stopping:
    """SIGTERM or SIGINT: the manager detaches and exits."""


@dataclass(frozen=True)
class ReloadRequested:
    """SIGHUP: read the configuration again."""


@dataclass(frozen=True)
class Reloaded:
    old: Settings
    new: Settings


@dataclass(frozen=True)
class LinkChanged:
    """RTM_NEWLINK or RTM_DELLINK."""

    link: Link
    removed: bool


@dataclass(frozen=True)
class AddressChanged:
    """RTM_NEWADDR or RTM_DELADDR."""

    index: int
    family: int
    address: str
    removed: bool


@dataclass(frozen=True)
class RouteChanged:
    """RTM_NEWROUTE or RTM_DELROUTE of the main table."""

    family: int
    removed: bool


@dataclass(frozen=True)
class NeighbourChanged:
    """RTM_NEWNEIGH or RTM_DELNEIGH of an IPv4 or IPv6 neighbour (the host resolved, refreshed or
    forgot one: its gateway's MAC among them)."""

    index: int
    address: str
    removed: bool


@dataclass(frozen=True)
class FiltersChanged:
    """A qdisc or filter was added or removed on a device (someone may have removed macnat's)."""

    index: int


@dataclass(frozen=True)
class Overrun:
    """Netlink events were lost: whatever depends on them must look at the system again."""


@dataclass(frozen=True)
class WifiAssociation:
    """nl80211: the station connected, roamed or disconnected."""

    index: int
    kind: str                 # "connect", "roam", "disconnect"
    bssid: str | None


# ---- derived: posted by duties ---------------------------------------------------------------

@dataclass(frozen=True)
class WifiAttached:
    """macnat's programs are on the Wi-Fi interface `link` (newly, or again after it was re-created)."""

    link: Link
    again: bool


@dataclass(frozen=True)
class WifiLost:
    """The Wi-Fi interface is gone (deleted, renamed): VM frames for the LAN are dropped meanwhile."""

    name: str


@dataclass(frozen=True)
class WifiMacChanged:
    old: str
    new: str


@dataclass(frozen=True)
class UplinkReady:
    """The uplink is a port of the bridge again (or for the first time): its FDB entries are needed."""

    uplink: Link
    bridge: Link


@dataclass(frozen=True)
class BridgeLost:
    name: str


@dataclass(frozen=True)
class NetworkIdentified:
    """The Wi-Fi's network as macnat knows it now (at start, after a change, after a roam)."""

    network: object   # macnat.manager.duties.network_change.Network


@dataclass(frozen=True)
class NetworkChanged:
    """The laptop is on another network: what was learned on the old one is gone."""

    old: object
    new: object


@dataclass(frozen=True)
class GatewaysPinned:
    """The gateways pinned on the LAN side changed (address -> MAC, None until resolved)."""

    gateways: dict


@dataclass(frozen=True)
class BindingsExpired:
    """The manager removed these learned bindings (address strings)."""

    addresses: tuple[str, ...]


@dataclass(frozen=True)
class BindingsRemoved:
    """The manager removed bindings for another reason than ageing (a claim's owner that did not
    answer, a gateway's address or MAC in a VM's hands)."""

    addresses: tuple[str, ...]


@dataclass(frozen=True)
class PortsReleased:
    """Bridge ports that went away released their VM MACs (port ifindex -> MACs), and the bindings
    of those MACs; static bindings' MACs are free for the next port to take."""

    ports: dict
