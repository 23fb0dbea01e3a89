"""The access point: what macnat's counters and tables show about it while attached, and what answers
ARP requests the host sends out of the Wi-Fi interface (for its own address, the VMs' and the LAN
hosts' it knows). Each finding says what the user can do about the AP's behaviour.

The requests change nothing but neighbour caches; an AP's proxy reply would point this host's entry
for a VM at the station's own MAC, so such an entry is put back as it was.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NUD_STALE

from macnat import netlink
from macnat.doctor import arp, topics
from macnat.doctor.core import check, error, ok, warning
from macnat.maps import ip_family, ip_str, mac_str

GROUP = "access_point"
MAX_PROBED = 8


@dataclass(frozen=True)
class Probe:
    host_ip: str
    host_mac: str
    vms: dict[str, str]              # a VM's IPv4 address -> its MAC
    gateway: str | None
    lan: list[str]                   # LAN hosts this host's neighbour table knows on the Wi-Fi interface
    answers: dict[str, set[str]]     # address -> MACs that answered for it


def _ipv4_bindings(found) -> dict[str, object]:
    return {ip_str(key): b for key, b in found.maps.bindings.items() if ip_family(key) == "ipv4"}


def _put_back(ctx, index: int, own_mac: str, before: dict[str, str | None]) -> None:
    for ip, mac in before.items():
        if netlink.neighbour_mac(ctx.ipr, index, ip) != own_mac or mac == own_mac:
            continue
        try:
            if mac:
                ctx.ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state=NUD_STALE)
            else:
                ctx.ipr.neigh("del", dst=ip, ifindex=index)
        except NetlinkError:
            pass  # changed again meanwhile: the kernel's own resolution takes over


def probe(ctx, target) -> Probe | None:
    """Ask once per target (cached): the ARP requests of the checks below, in one go."""
    def ask() -> Probe | None:
        wifi = ctx.link(target.wifi)
        host_ip = wifi and netlink.interface_address(ctx.ipr, wifi.index, socket.AF_INET)
        if not host_ip or not wifi.carrier:
            return None
        found = ctx.attachment(target.wifi)
        bound = sorted(_ipv4_bindings(found).items(), key=lambda item: socket.inet_aton(item[0])) if found else []
        vms = {ip: mac_str(b.mac) for ip, b in bound[:MAX_PROBED]}
        gateway = netlink.default_gateway(ctx.ipr, wifi.index)
        own = set(netlink.host_addresses(ctx.ipr))
        lan = sorted({msg.get("NDA_DST") for msg in ctx.ipr.get_neighbours(family=socket.AF_INET, ifindex=wifi.index)}
                     - own - set(vms) - {gateway, None})[:MAX_PROBED]
        before = {ip: netlink.neighbour_mac(ctx.ipr, wifi.index, ip) for ip in vms}
        targets = [host_ip, *vms, *([gateway] if gateway else []), *lan]
        try:
            answers = arp.ask(wifi.name, wifi.mac, host_ip, targets)
        finally:
            _put_back(ctx, wifi.index, wifi.mac, before)
        return Probe(host_ip, wifi.mac, vms, gateway, lan, answers)
    return ctx.cached(("arp", target.wifi), ask)


@check(GROUP, "ap-group-unicast", "AP: group frames as unicast", needs_root=True)
def group_unicast(ctx, target):
    found = ctx.attachment(target.wifi)
    if found is None:
        return None
    restored = found.maps.counter_total("group_restored")
    if restored:
        return ok(f"the access point delivers broadcasts and multicast to the station as unicast (multicast-to-unicast): "
                  f"macnat restored {restored} of them to their group address (counter group_restored), so the VMs "
                  "get them; nothing to do", group_restored=restored)
    return ok("none seen (counter group_restored is 0)", group_restored=0)


@check(GROUP, "ap-proxy-arp", "AP: proxy ARP", needs_root=True)
def proxy_arp(ctx, target):
    p = probe(ctx, target)
    if p is None:
        return None
    proxied = [ip for ip in [p.host_ip, *p.vms] if p.host_mac in p.answers[ip]]
    host_claimed = p.answers[p.host_ip] - {p.host_mac}
    vm_claimed = {ip: p.answers[ip] - {p.host_mac, mac} for ip, mac in p.vms.items() if p.answers[ip] - {p.host_mac, mac}}
    if host_claimed:
        return error(f"{', '.join(sorted(host_claimed))} answers ARP for this host's own address {p.host_ip}: an "
                     "address conflict on the LAN", f"find that machine (its MAC's vendor, the router's DHCP leases) "
                     f"and give it or {target.wifi} another address", topics.ADDRESS_CONFLICT,
                     conflicts={p.host_ip: sorted(host_claimed)})
    if proxied:
        named = ", ".join(f"{ip} ({'this host' if ip == p.host_ip else 'a VM'})" for ip in proxied)
        vms = [ip for ip in proxied if ip != p.host_ip]
        pin = "; ".join(f"ip neigh replace {ip} lladdr {p.vms[ip]} dev {target.wifi} nud permanent" for ip in vms)
        return warning(f"the access point answers ARP itself (proxy ARP, as hostapd's proxy_arp=1 does): for {named} "
                       f"it replied with the station's MAC {p.host_mac}, which no VM does. Such an AP answers only "
                       "for addresses its DHCP snooping learned (one per station), and may keep other ARP requests "
                       "from the station: LAN hosts may reach one address behind it, not every VM"
                       + ("; and this host, told its own MAC for such a VM, cannot reach it" if vms else ""),
                       "turn proxy ARP off for this network if it is yours (hostapd: proxy_arp=0; on controllers: "
                       "'ARP proxy', 'ARP suppression'); otherwise reach the VMs from the LAN through the host "
                       "(port forwarding) or use a network without it" + (f"; for this host: {pin}" if pin else ""),
                       topics.AP_PROXY_ARP, proxied=proxied)
    if vm_claimed:
        return warning("; ".join(f"{', '.join(sorted(macs))} also answers ARP for {ip}, a VM's address"
                                 for ip, macs in vm_claimed.items()) + ": an address conflict on the LAN",
                       "give the VM another address (or the LAN host: see the router's DHCP leases)",
                       topics.ADDRESS_CONFLICT, conflicts={ip: sorted(m) for ip, m in vm_claimed.items()})
    vms = f" and the VMs' {', '.join(p.vms)}" if p.vms else ""
    return ok(f"ARP for this host's {p.host_ip}{vms}: no one but their owners answered", probed=[p.host_ip, *p.vms])


def isolated(p: Probe | None) -> bool:
    """LAN hosts this host has talked to no longer answer it."""
    return bool(p and p.lan and not any(p.answers[ip] for ip in p.lan))


@check(GROUP, "ap-isolation", "AP: client isolation", needs_root=True)
def isolation(ctx, target):
    p = probe(ctx, target)
    if p is None:
        return None
    gateway_answers = bool(p.gateway and p.answers[p.gateway])
    answering = [ip for ip in p.lan if p.answers[ip]]
    if isolated(p):
        fix = ("turn client isolation off for this network if it is yours ('AP isolation', 'client isolation', "
               "'guest network'; hostapd: ap_isolate=0); otherwise use a network without it")
        if gateway_answers:
            return warning(f"only the gateway {p.gateway} answers ARP from {target.wifi}; {', '.join(p.lan)}, which this "
                           "host has talked to, do not: the access point isolates its clients, so LAN hosts reach "
                           "neither the VMs nor this host", fix, topics.AP_ISOLATION, silent=p.lan)
        return warning(f"neither the gateway nor {', '.join(p.lan)} answer ARP from {target.wifi}", fix,
                       topics.AP_ISOLATION, silent=p.lan)
    if not p.lan:
        return ok(("the gateway answers; " if gateway_answers else "") + "no other LAN host known to ask (ping one "
                  "from this host, then run doctor again)")
    return ok(f"LAN hosts answer ARP from {target.wifi}: {', '.join(answering)}", answering=answering)


@check(GROUP, "ap-arp-offload", "AP: ARP offload", needs_root=True)
def arp_offload(ctx, target):
    found = ctx.attachment(target.wifi)
    if found is None:
        return None
    talking = {ip: b for ip, b in _ipv4_bindings(found).items() if b.tx_packets}
    if isolated(probe(ctx, target)):
        return ok("not told apart: the client isolation above keeps the LAN's answers from the VMs too")
    if not talking:
        return ok("no VM has sent anything from an IPv4 address yet: nothing to tell")
    answered = [ip for ip, b in talking.items() if b.rx_packets]
    # An ARP reply or request for a VM's address is unicast to the station: wifi_to_vm counts it.
    to_vms = found.maps.counter_total("wifi_to_vm")
    to_host = found.maps.counter_total("wifi_to_host")
    if not answered and not to_vms and to_host:
        return warning(f"the VMs ({', '.join(talking)}) sent {sum(b.tx_packets for b in talking.values())} frames and "
                       f"got nothing back: no unicast from Wi-Fi reached any VM, not even an ARP reply (counter "
                       f"wifi_to_vm is 0), while the host gets its own traffic ({to_host} frames, counter wifi_to_host). "
                       "The Wi-Fi firmware may handle ARP itself (ARP offload) and drop it for every other address",
                       f"iw dev {target.wifi} set power_save off   # some firmware offloads ARP in power save only; "
                       "otherwise a Wi-Fi adapter whose driver passes ARP to the host (mac80211 drivers do)",
                       topics.ARP_OFFLOAD, silent=list(talking))
    return ok(f"{len(answered)} of {len(talking)} talking VMs got answers; {to_vms} unicast frames from Wi-Fi "
              "reached VMs", answered=answered, to_vms=to_vms)
