"""Interfaces: the Wi-Fi station (nl80211: its type, its network, 4-address mode) and the bridge
(its ports, a second way to the LAN, an address, VLAN filtering)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from macnat import constants, netlink, nl80211
from macnat.doctor import topics
from macnat.doctor.core import check, error, ok, warning
from macnat.plumbing import uplink_names

GROUP = "interfaces"
SYS_NET = Path("/sys/class/net")


@check(GROUP, "targets", "checking", per_target=False)
def targets(ctx):
    if not ctx.targets:
        return error("no Wi-Fi interface to check: none given, macnat is not attached, and there is no "
                     "settings file, enabled macnat@ service or Wi-Fi station here",
                     "macnat doctor wlan0 vmbr0   # your Wi-Fi interface and the VMs' bridge", topics.NOTHING_TO_CHECK)
    return ok("; ".join(t.describe() + (f" (bridge from {t.bridge_from})" if t.bridge_from else "")
                        for t in ctx.targets),
              targets=[{"wifi": t.wifi, "bridge": t.bridge, "bridge_from": t.bridge_from} for t in ctx.targets])


@dataclass(frozen=True)
class Wireless:
    """What nl80211 says about one interface."""

    available: bool                          # the kernel has nl80211 at all
    interface: nl80211.Interface | None      # None: nl80211 does not know it (not a Wi-Fi interface)
    bss: nl80211.Bss | None = None


def wireless(ctx, link: netlink.Link) -> Wireless:
    def ask() -> Wireless:
        try:
            iw = nl80211.open_iw()
        except nl80211.Unavailable:
            return Wireless(False, None)
        with iw:
            iface = nl80211.interface(iw, link.index)
            bss = nl80211.associated_bss(iw, link.index) if iface and iface.iftype == nl80211.STATION else None
        return Wireless(True, iface, bss)
    return ctx.cached(("wireless", link.index), ask)


@check(GROUP, "wifi", "{wifi}: exists")
def wifi_exists(ctx, target):
    link = ctx.link(target.wifi)
    if link is None:
        return error(f"no interface named {target.wifi} in this network namespace",
                     "ip -br link   # or: iw dev; the Wi-Fi interface is wlan0, wlp2s0, wlx...", topics.NO_SUCH_INTERFACE)
    return ok(f"index {link.index}, MAC {link.mac}, {'up' if link.up else 'down'}", index=link.index, mac=link.mac)


@check(GROUP, "wifi-station", "{wifi}: Wi-Fi station")
def wifi_station(ctx, target):
    link = ctx.link(target.wifi)
    if link is None:
        return None
    found = wireless(ctx, link)
    if not found.available:
        return warning(f"this kernel has no nl80211 (no cfg80211): whether {target.wifi} is a station, its network "
                       "and 4-address mode are not checked; expected in macnat's lab or a VM, not on a laptop",
                       "nothing in the lab; on a laptop, load the Wi-Fi driver: iw dev should list the interface",
                       topics.NO_NL80211, nl80211=False)
    if found.interface is None:
        return warning(f"nl80211 does not know {target.wifi}: it is not a Wi-Fi interface (a wired NIC can simply "
                       "be a port of the bridge, without macnat)",
                       f"iw dev   # the Wi-Fi station; for a wired NIC: ip link set {target.wifi} master {target.bridge or 'vmbr0'}",
                       topics.NOT_A_STATION, nl80211=True, wireless=False)
    iface = found.interface
    if iface.iftype != nl80211.STATION:
        return error(f"{target.wifi} is a Wi-Fi {iface.iftype} interface, not a station (client)",
                     "macnat doctor WIFI with the station interface (iw dev lists each one's type)",
                     topics.NOT_A_STATION, iftype=iface.iftype, wiphy=iface.wiphy)
    return ok(f"a station on phy{iface.wiphy}", iftype=iface.iftype, wiphy=iface.wiphy)


@check(GROUP, "wifi-associated", "{wifi}: associated")
def wifi_associated(ctx, target):
    link = ctx.link(target.wifi)
    if link is None:
        return None
    connect = (f"nmcli device wifi connect SSID --ask   # or: wpa_cli -i {target.wifi} reconnect; "
               f"and ip link set {target.wifi} up")
    if not link.up:
        return error(f"{target.wifi} is down", f"ip link set {target.wifi} up; {connect}", topics.NOT_ASSOCIATED)
    found = wireless(ctx, link)
    if found.interface is None or found.interface.iftype != nl80211.STATION:
        if link.carrier:
            return ok("it has a carrier (no nl80211 to name the network)", carrier=True)
        return error(f"{target.wifi} has no carrier: not associated", connect, topics.NOT_ASSOCIATED, carrier=False)
    if found.bss is None:
        return error(f"{target.wifi} is not associated with any network", connect, topics.NOT_ASSOCIATED)
    ssid = nl80211.network_name(found.interface, found.bss)
    return ok(f"SSID {ssid!r}, BSSID {found.bss.bssid}, {found.bss.frequency} MHz",
              ssid=ssid, bssid=found.bss.bssid, frequency=found.bss.frequency)


@check(GROUP, "wifi-bridged", "{wifi}: not a bridge port")
def wifi_bridged(ctx, target):
    link = ctx.link(target.wifi)
    if link is None:
        return None
    if link.master:
        master = netlink.link_by_index(ctx.ipr, link.master)
        name = master.name if master else f"index {link.master}"
        return error(f"{target.wifi} is a port of {name}: macnat needs the station standalone",
                     f"ip link set {target.wifi} nomaster   # and take it out of {name}'s bridge-ports",
                     topics.WIFI_BRIDGED, master=name)
    return ok("standalone")


@check(GROUP, "wifi-4addr", "{wifi}: 4-address mode", needs_root=True)
def wifi_4addr(ctx, target):
    link = ctx.link(target.wifi)
    if link is None:
        return None
    found = wireless(ctx, link)
    if found.interface is None or found.interface.iftype != nl80211.STATION:
        return None
    if found.interface.use_4addr:
        return warning(f"{target.wifi} is in 4-address mode: if the access point accepts 4-address stations, "
                       "bridge it directly and do without macnat; if not, nothing gets through",
                       f"iw dev {target.wifi} set 4addr off   # for macnat; or: ip link set {target.wifi} master "
                       f"{target.bridge or 'vmbr0'} without macnat", topics.FOUR_ADDRESS, four_address="on")
    with nl80211.open_iw() as iw:
        allowed = nl80211.station_allows_4addr(iw, found.interface.wiphy)
    if allowed:
        return ok(f"off; the driver would allow it (probed with a 4-address interface on phy{found.interface.wiphy}, "
                  "deleted at once): with an access point that accepts 4-address stations (hostapd wds_sta=1, "
                  "'WDS' on some routers) the station could be bridged directly instead", four_address="allowed")
    return ok("off; the driver does not allow it on a station, so MAC translation is the way onto the LAN",
              four_address="not allowed")


@check(GROUP, "bridge", "{bridge}: a bridge")
def bridge(ctx, target):
    if not target.bridge:
        return warning(f"no bridge known for {target.wifi}: none given, none in its settings file, not attached",
                       f"macnat doctor {target.wifi} vmbr0   # or set it: macnat config write {target.wifi} vmbr0",
                       topics.NO_BRIDGE)
    link = ctx.link(target.bridge)
    if link is None:
        return error(f"no interface named {target.bridge} in this network namespace",
                     f"ip link add {target.bridge} type bridge && ip link set {target.bridge} up   "
                     "# or declare it in /etc/network/interfaces", topics.NO_BRIDGE)
    if link.kind != "bridge":
        return error(f"{target.bridge} is not a bridge (it is {link.kind or 'a plain device'})",
                     f"macnat doctor {target.wifi} BRIDGE with the bridge the VMs' NICs are ports of "
                     "(bridge link lists them)", topics.NO_BRIDGE)
    if not link.up:
        return error(f"{target.bridge} is down", f"ip link set {target.bridge} up", topics.NO_BRIDGE)
    return ok(f"up, MAC {link.mac}")


def _bridge_link(ctx, target) -> netlink.Link | None:
    link = ctx.link(target.bridge)
    return link if link is not None and link.kind == "bridge" else None


def port_kind(link: netlink.Link) -> str:
    """What a port is, from sysfs: Wi-Fi, a physical NIC, or a virtual device of some kind."""
    base = SYS_NET / link.name
    if (base / "phy80211").exists() or (base / "wireless").exists():
        return "Wi-Fi"
    if (base / "device").exists():
        return "physical NIC"
    return link.kind or "virtual device"


@check(GROUP, "bridge-ports", "{bridge}: ports")
def bridge_ports(ctx, target):
    link = _bridge_link(ctx, target)
    if link is None:
        return None
    ports = netlink.bridge_ports(ctx.ipr, link.index)
    uplink = uplink_names(target.wifi)[0]
    names = ", ".join(f"{p.name} ({'macnat uplink' if p.name == uplink else port_kind(p)})" for p in ports) or "none"
    attached = ctx.attachment(target.wifi)
    if attached is not None and attached.uplink is not None and attached.uplink.master != link.index:
        return error(f"macnat's uplink {attached.uplink.name} is not a port of {target.bridge} (ports: {names}): "
                     "the VMs are cut off from the LAN",
                     f"ip link set {attached.uplink.name} master {target.bridge}   # a running manager does this itself "
                     "within a second; if it keeps happening, see the ifreload entry", topics.UPLINK_NOT_IN_BRIDGE,
                     ports=[p.name for p in ports])
    return ok(names, ports=[p.name for p in ports])


def known_lan_macs(ctx, target) -> dict[str, str]:
    """MACs known to be on the Wi-Fi LAN -> what they are: the gateway, and LAN hosts macnat saw."""
    from macnat.maps import ip_str, mac_str

    known = {}
    wifi = ctx.link(target.wifi)
    attached = ctx.attachment(target.wifi)
    if attached is not None:
        for key, lan_mac in attached.maps.lan_macs.items():
            known[mac_str(key.addr)] = "a gateway" if lan_mac.flags & constants.LAN_PINNED else "a LAN host that talked to a VM"
        for key, lan_addr in attached.maps.lan_addrs.items():  # the manager pins the gateways' addresses too
            if lan_addr.flags & constants.LAN_PINNED and any(lan_addr.mac):
                known[mac_str(lan_addr.mac)] = f"the gateway {ip_str(key)}"
    if wifi is not None:
        gateway = netlink.default_gateway(ctx.ipr, wifi.index)
        mac = gateway and netlink.neighbour_mac(ctx.ipr, wifi.index, gateway)
        if mac:
            known[mac] = f"the gateway {gateway}"
    return known


@check(GROUP, "bridge-uplink", "{bridge}: no second uplink")
def bridge_uplink(ctx, target):
    link = _bridge_link(ctx, target)
    if link is None:
        return None
    uplink = uplink_names(target.wifi)[0]
    wifi = ctx.link(target.wifi)
    known = known_lan_macs(ctx, target)
    if wifi is not None:
        known[wifi.mac] = f"{target.wifi} itself"
    attached = ctx.attachment(target.wifi)
    # A running manager pins the LAN MACs to its uplink (sticky: the bridge learns them nowhere else),
    # and the datapath refuses them from any other port: the manager names the ports they came from.
    forged = (attached.manager or {}).get("forged_sources", {}) if attached is not None else {}
    uplinks, dormant = {}, []
    for port in netlink.bridge_ports(ctx.ipr, link.index):
        if port.name == uplink:
            continue
        kind = port_kind(port)
        behind = netlink.fdb_macs(ctx.ipr, port.index)
        seen = [f"{what} ({mac})" for mac, what in known.items() if mac in behind]
        from_lan = forged.get(port.name, {})
        if from_lan.get("owner") == "lan":
            what = known.get(from_lan["mac"], "a LAN host")
            seen.append(f"frames from {what} ({from_lan['mac']}) came in on it")
        if seen:
            uplinks[port.name] = f"{port.name} ({kind}) leads to the LAN: {'; '.join(seen)}"
        elif kind == "Wi-Fi" or (kind == "physical NIC" and port.carrier):
            uplinks[port.name] = f"{port.name} is a {kind} with a carrier"
        elif kind == "physical NIC":
            dormant.append(port.name)
    fix = "; ".join(f"ip link set {name} nomaster" for name in [*uplinks, *dormant]) + \
        f"   # and take it out of {target.bridge}'s bridge-ports in /etc/network/interfaces"
    if uplinks:
        return error("a second uplink: " + "; ".join(uplinks.values()) + ". With macnat's uplink that is a loop: "
                     "broadcasts circle (a storm), LAN hosts pass for VMs, answers go where macnat does not see them",
                     fix, topics.SECOND_UPLINK, uplinks=list(uplinks))
    if dormant:
        return warning(f"{', '.join(dormant)}: a physical NIC without a carrier in {target.bridge} (Proxmox's "
                       "default vmbr0): a cable into the same LAN makes it a second uplink",
                       fix, topics.SECOND_UPLINK, uplinks=dormant)
    return ok("no physical, Wi-Fi or LAN-facing port besides macnat's uplink")


def _listening_dhcp_servers() -> list[str]:
    """Processes of this network namespace with a UDP socket on port 67 (a DHCP server or relay)."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == 67:
                inodes.add(fields[9])
    if not inodes:
        return []
    owners = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            pid = fd.parent.parent.name
            try:
                owners.add(f"{Path(f'/proc/{pid}/comm').read_text().strip()} (pid {pid})")
            except OSError:
                continue
    return sorted(owners) or ["a process of another user"]


@check(GROUP, "bridge-address", "{bridge}: no address")
def bridge_address(ctx, target):
    link = _bridge_link(ctx, target)
    if link is None:
        return None
    addresses = [f"{msg.get('IFA_LOCAL') or msg.get('IFA_ADDRESS')}/{msg['prefixlen']}"
                 for msg in ctx.ipr.get_addr(index=link.index) if msg["scope"] == 0]  # link-local IPv6 is everyone's
    if not addresses:
        return ok(f"none: the host is on the LAN through {target.wifi}")
    fix = f"ip addr flush dev {target.bridge} scope global   # and remove the address from its stanza in /etc/network/interfaces"
    servers = _listening_dhcp_servers()
    if servers:
        return error(f"{target.bridge} has {', '.join(addresses)} and a DHCP server listens ({', '.join(servers)}): "
                     "it answers the VMs' requests beside the LAN's server, so VMs may lease a private address "
                     "(a leftover NAT setup?)", f"stop that DHCP server for {target.bridge}; {fix}",
                     topics.BRIDGE_ADDRESS, addresses=addresses, dhcp_servers=servers)
    return warning(f"{target.bridge} has {', '.join(addresses)}: VMs that use it as their gateway are routed by the "
                   "host instead of reaching the LAN (a leftover NAT setup?)", fix, topics.BRIDGE_ADDRESS,
                   addresses=addresses)


def vlan_result(bridge_name: str, filtering: bool, default_pvid: int, port_vlans: dict[str, list[dict]], uplink: str):
    """The VLAN finding from the bridge's vlan_filtering and `bridge -j vlan show` (port -> its VLANs)."""
    if not filtering:
        return ok("VLAN filtering off: the VMs' frames reach macnat's uplink untagged (a VM that tags its own "
                  "frames sends them tagged, which macnat does not carry)", vlan_filtering=False)

    def pvid(port: str) -> int | None:
        return next((v["vlan"] for v in port_vlans.get(port, []) if "PVID" in v.get("flags", [])), None)

    lan = pvid(uplink) or default_pvid
    tagged_uplink = [v["vlan"] for v in port_vlans.get(uplink, []) if "Egress Untagged" not in v.get("flags", [])]
    elsewhere = {port: pvid(port) for port in port_vlans if port not in (uplink, bridge_name) and pvid(port) != lan}
    problems = [f"{port} is on VLAN {vid}" if vid else f"{port} has no untagged VLAN" for port, vid in elsewhere.items()]
    if tagged_uplink:
        problems.append(f"{uplink} carries tagged VLAN {', '.join(map(str, tagged_uplink))}")
    if problems:
        return warning(f"{bridge_name} filters VLANs and the LAN is its VLAN {lan}: " + "; ".join(problems) +
                       ". A 3-address station carries one untagged LAN: frames of other VLANs never get out",
                       "; ".join(f"bridge vlan add dev {port} vid {lan} pvid untagged" for port in elsewhere) +
                       "   # on Proxmox VE: remove the VLAN tag from the VM's network device",
                       topics.VLAN, vlan_filtering=True, lan_vlan=lan, other=list(elsewhere))
    return ok(f"VLAN filtering on; every VM port is on the LAN's VLAN {lan}", vlan_filtering=True, lan_vlan=lan)


@check(GROUP, "bridge-vlan", "{bridge}: VLANs")
def bridge_vlan(ctx, target):
    link = _bridge_link(ctx, target)
    if link is None:
        return None
    base = SYS_NET / target.bridge / "bridge"
    try:
        filtering = (base / "vlan_filtering").read_text().strip() == "1"
        default_pvid = int((base / "default_pvid").read_text())
    except OSError:  # a kernel without CONFIG_BRIDGE_VLAN_FILTERING: every frame untagged
        filtering, default_pvid = False, 1
    port_vlans = {}
    if filtering:
        out = subprocess.run(["bridge", "-j", "vlan", "show"], capture_output=True, text=True).stdout
        port_vlans = {entry["ifname"]: entry.get("vlans", []) for entry in json.loads(out or "[]")}
    return vlan_result(target.bridge, filtering, default_pvid, port_vlans, uplink_names(target.wifi)[0])
