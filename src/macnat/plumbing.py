"""The kernel objects of an attachment, each made, checked and removed on its own.

- the uplink: a veth pair whose one end is a port of the bridge (the other only keeps its carrier up),
  with `uplink_egress` on the port's TC egress;
- `wifi_ingress` and `wifi_egress` on the Wi-Fi interface's clsact (created only where missing);
- config[0], which tells the programs where to forward.

`macnat attach` puts them all in place, all or nothing (loader.attach); the manager uses the same
functions one by one to repair what the rest of the system changes under it (the Wi-Fi interface
re-created, the port taken out of the bridge by `ifreload -a`, the bridge re-created).

The port is named `vethmn<wifi>`: Proxmox's ifupdown2 keeps ports matching its default
`bridge-ports-condone-regex` `^(tap|veth|fwpr)` when "Apply Configuration" runs `ifreload -a`, where a
port with any other unlisted name is removed from the bridge.
"""

from __future__ import annotations

import contextlib
import errno
import zlib
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from macnat import constants, netlink
from macnat.errors import MacnatError
from macnat.maps import Config, Maps, ip_key, mac_bytes, u8, u32

TC_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
TC_PARENT_ID = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
FILTER_NAME_PREFIX = "macnat:"
WIFI_HOOKS = {hook: name for name, (role, hook) in constants.PROGRAMS.items() if role == "wifi"}
IFNAMSIZ = 15


def uplink_names(wifi_name: str) -> tuple[str, str]:
    """(bridge port, its peer) for a Wi-Fi interface, derived from its name alone (its index changes when
    it is re-created), within the kernel's 15 characters."""
    if len("vethmn" + wifi_name) <= IFNAMSIZ and len("mnpeer" + wifi_name) <= IFNAMSIZ:
        tag = wifi_name
    else:
        tag = f"{zlib.crc32(wifi_name.encode()):08x}"
    return f"vethmn{tag}", f"mnpeer{tag}"


def _disable_ipv6(ifname: str) -> None:
    # The uplink pair must stay silent: router solicitations or MLD from it would reach the VMs.
    path = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    if path.exists():
        path.write_text("1")


def create_uplink(ipr: IPRoute, wifi_name: str, bridge: netlink.Link) -> netlink.Link:
    """The veth pair, its port end in `bridge` (still down: the caller attaches its filter first)."""
    port_name, peer_name = uplink_names(wifi_name)
    try:
        ipr.link("add", ifname=port_name, kind="veth", peer=peer_name)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise MacnatError(f"'{port_name}' already exists: a macnat uplink left behind? "
                              f"macnat detach {wifi_name}, or ip link del {port_name}") from None
        raise
    uplink = netlink.link(ipr, port_name)
    try:
        for name in (port_name, peer_name):
            _disable_ipv6(name)
        ipr.link("set", index=uplink.index, ifalias=f"macnat uplink of {wifi_name} into its bridge")
        peer = netlink.link(ipr, peer_name)
        ipr.link("set", index=peer.index, mtu=bridge.mtu, state="up")
        enslave(ipr, uplink, bridge)
        ipr.tc("add", "clsact", uplink.index)
    except BaseException:
        remove_uplink(ipr, uplink.index)
        raise
    return netlink.link(ipr, port_name)


MCAST_ROUTER_PERMANENT = 2   # IFLA_BRPORT_MULTICAST_ROUTER: forward all multicast to this port


def enslave(ipr: IPRoute, uplink: netlink.Link, bridge: netlink.Link) -> None:
    """Make the uplink a port of the bridge, with the bridge's MTU, as a multicast router port: behind
    it is the whole LAN, whose listeners' reports the bridge never sees (frames from Wi-Fi enter
    through the bridge's own transmit path). With snooping active (a querier on vmbr0), group
    traffic such as mDNS on ff02::fb would otherwise not reach the LAN at all. A port leaving the
    bridge loses this, so it is set each time."""
    ipr.link("set", index=uplink.index, mtu=bridge.mtu, master=bridge.index)
    ipr.brport("set", index=uplink.index, multicast_router=MCAST_ROUTER_PERMANENT)


def set_up(ipr: IPRoute, link: netlink.Link) -> None:
    ipr.link("set", index=link.index, state="up")


def remove_uplink(ipr: IPRoute, index: int) -> None:
    """Delete the pair (its peer, filter, clsact and FDB entries go with it)."""
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise


def add_filter(ipr: IPRoute, index: int, hook: str, fd: int, program: str) -> None:
    ipr.tc("add-filter", "bpf", index, constants.TC_HANDLE, fd=fd, name=FILTER_NAME_PREFIX + program,
           parent=TC_PARENT[hook], classid=1, direct_action=True, prio=constants.TC_PRIO)


def del_filter(ipr: IPRoute, index: int, hook: str) -> None:
    try:
        ipr.tc("del-filter", "bpf", index, constants.TC_HANDLE, parent=TC_PARENT[hook], prio=constants.TC_PRIO)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


def _filters(ipr: IPRoute, index: int, hook: str) -> list:
    try:
        return list(ipr.get_filters(index=index, parent=TC_PARENT_ID[hook]))
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENODEV, errno.ENOENT):  # no clsact, or no device
            return []
        raise


def macnat_hooks(ipr: IPRoute, index: int) -> set[str]:
    """The hooks of the device on which a macnat filter sits."""
    return {hook for hook in TC_PARENT if any(msg["info"] >> 16 == constants.TC_PRIO for msg in _filters(ipr, index, hook))}


def foreign_filters(ipr: IPRoute, index: int) -> bool:
    """Whether filters other than macnat's sit on the device's clsact."""
    return any(msg["info"] >> 16 != constants.TC_PRIO for hook in TC_PARENT for msg in _filters(ipr, index, hook))


def attach_uplink(ipr: IPRoute, uplink_index: int, programs: dict[str, int]) -> None:
    add_filter(ipr, uplink_index, "egress", programs["uplink_egress"], "uplink_egress")


def attach_wifi(ipr: IPRoute, wifi_index: int, programs: dict[str, int]) -> bool:
    """wifi_egress, then wifi_ingress (frames for the VMs start arriving last) on the Wi-Fi interface.
    True when macnat created its clsact (so detaching may remove it). All or nothing."""
    created_clsact = False
    try:
        ipr.tc("add", "clsact", wifi_index)
        created_clsact = True
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
    attached = []
    try:
        for hook in ("egress", "ingress"):
            del_filter(ipr, wifi_index, hook)  # one a previous attachment to this device left
            add_filter(ipr, wifi_index, hook, programs[WIFI_HOOKS[hook]], WIFI_HOOKS[hook])
            attached.append(hook)
    except BaseException:
        detach_wifi(ipr, wifi_index, created_clsact, attached)
        raise
    return created_clsact


def detach_wifi(ipr: IPRoute, wifi_index: int, created_clsact: bool, hooks=tuple(TC_PARENT)) -> None:
    """Remove macnat's filters from the Wi-Fi interface, and the clsact it created if nothing else uses it."""
    for hook in hooks:
        del_filter(ipr, wifi_index, hook)
    if created_clsact and not foreign_filters(ipr, wifi_index):
        with contextlib.suppress(NetlinkError):
            ipr.tc("del", "clsact", wifi_index)


def update_config(maps: Maps, **fields) -> Config:
    """Change some fields of config[0] (the manager is its only writer once attached)."""
    config = maps.current_config()
    for name, value in fields.items():
        setattr(config, name, mac_bytes(value) if name == "wifi_mac" else value)
    maps.config.update(u32(0), config)
    return config


def protect_host_addresses(ipr: IPRoute, maps: Maps) -> dict[str, str]:
    """Put every address of this host into host_addrs, so no VM frame may claim one; address -> interface."""
    addresses = netlink.host_addresses(ipr)
    for ip in addresses:
        maps.host_addrs.update(ip_key(ip), u8(1))
    return addresses
