"""Conflicting setups: what an earlier way of putting VMs on Wi-Fi (parprouted, relayd, ndppd, NAT)
or the host's network management (ifupdown2's `ifreload -a`, NetworkManager) leaves that fights macnat.

Only this network namespace counts: the daemons are those whose network namespace is doctor's, the
rules and sysctls are this namespace's own.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

from macnat.doctor import ifupdown, nm, topics
from macnat.doctor.core import ERROR, WARNING, Result, check, error, ok, warning
from macnat.plumbing import uplink_names

GROUP = "conflicts"

# name -> (verdict, what it does to macnat)
DAEMONS = {
    "parprouted": (ERROR, "answers ARP on both sides with the host's MACs and routes the VMs' traffic itself"),
    "relayd": (ERROR, "answers ARP for the LAN and routes the VMs' traffic itself"),
    "ndppd": (ERROR, "answers neighbour solicitations for the VMs' IPv6 addresses itself"),
    "dhcp-helper": (WARNING, "relays the VMs' DHCP requests a second time"),
    "dhcrelay": (WARNING, "relays the VMs' DHCP requests a second time"),
}


def _netns_processes():
    """(pid, name, command line) of every process in doctor's network namespace."""
    mine = os.readlink("/proc/self/ns/net")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns/net") != mine:
                continue
            name = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        yield int(proc.name), name, cmdline


@check(GROUP, "daemons", "parprouted, relayd, ndppd", per_target=False, needs_root=True)
def daemons(ctx):
    found = [(pid, name, cmdline) for pid, name, cmdline in _netns_processes() if name in DAEMONS]
    if not found:
        return ok(f"none of {', '.join(DAEMONS)} runs in this network namespace")
    worst = ERROR if any(DAEMONS[name][0] == ERROR for _, name, _ in found) else WARNING
    text = "; ".join(f"{name} runs (pid {pid}: {cmdline}): it {DAEMONS[name][1]}" for pid, name, cmdline in found)
    fix = "; ".join(f"systemctl disable --now {name}   # or: kill {pid}" for pid, name, _ in found) + \
        "; then remove what it set up (proxy_arp sysctls, /32 routes: ip route show proto static)"
    return Result(worst, text + ". macnat does all of it in the kernel; both together fight", fix, topics.DAEMONS,
                  {"daemons": [{"pid": pid, "name": name, "cmdline": cmdline} for pid, name, cmdline in found]})


def nat_rules() -> list[tuple[str, str]]:
    """(the rule, the command that deletes it) for every masquerade or SNAT rule of this namespace:
    nftables (which also shows iptables-nft's rules) and the legacy iptables tables."""
    found = []
    if shutil.which("nft"):
        out = subprocess.run(["nft", "-a", "list", "ruleset"], capture_output=True, text=True).stdout
        table = chain = None
        for line in out.splitlines():
            words = line.split()
            if words[:1] == ["table"]:
                table = " ".join(words[1:3])
            elif words[:1] == ["chain"]:
                chain = words[1]
            elif re.search(r"\b(masquerade|snat)\b", line) and "# handle" in line:
                rule, _, handle = line.strip().rpartition("# handle")
                found.append((f"nft: {rule.strip()}", f"nft delete rule {table} {chain} handle {handle.strip()}"))
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        if shutil.which(f"{tool}-save"):
            out = subprocess.run([f"{tool}-save", "-t", "nat"], capture_output=True, text=True).stdout
            found += [(f"{tool}: {line}", f"{tool} -t nat {line.replace('-A ', '-D ', 1)}")
                      for line in out.splitlines() if line.startswith("-A ") and re.search(r"-j (MASQUERADE|SNAT)\b", line)]
    return found


def _concerns(rule: str, names: set[str], addresses: list) -> bool:
    words = set(re.findall(r"[\w.:+-]+", rule.replace('"', " ")))
    if names & words:
        return True
    for prefix in re.findall(r"\b\d+\.\d+\.\d+\.\d+/\d+\b", rule):
        if any(address in ipaddress.ip_network(prefix, strict=False) for address in addresses):
            return True
    return False


@check(GROUP, "masquerade", "{bridge}: NAT", needs_root=True)
def masquerade(ctx, target):
    bridge = ctx.link(target.bridge)
    addresses = [ipaddress.ip_address(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"))
                 for msg in (ctx.ipr.get_addr(index=bridge.index, family=2) if bridge else [])]
    names = {target.wifi} | ({target.bridge} if target.bridge else set())
    rules = [(rule, delete) for rule, delete in ctx.cached("nat", nat_rules) if _concerns(rule, names, addresses)]
    if not rules:
        return ok(f"no masquerade or SNAT rule for {' or '.join(sorted(names))}")
    forwarding = _sysctl("ipv4/ip_forward")
    return warning("NAT for the VMs: " + "; ".join(rule for rule, _ in rules) +
                   f" (ip_forward={forwarding}). VMs set up for it (the host as their gateway, a private subnet) "
                   "stay behind the host's NAT instead of being on the LAN; with macnat they need no NAT",
                   "; ".join(delete for _, delete in rules) + "   # and remove it where it is made at boot "
                   "(/etc/nftables.conf, post-up lines in /etc/network/interfaces)", topics.MASQUERADE,
                   rules=[rule for rule, _ in rules])


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys/net", name).read_text().strip()
    except OSError:
        return None


@check(GROUP, "proxy-arp", "proxy ARP sysctls")
def proxy_arp(ctx, target):
    found = {}
    for ifname in filter(None, (target.wifi, target.bridge)):
        for key, path in (("proxy_arp", f"ipv4/conf/{ifname}/proxy_arp"), ("proxy_ndp", f"ipv6/conf/{ifname}/proxy_ndp")):
            everywhere = _sysctl(path.replace(f"/{ifname}/", "/all/"))
            value = _sysctl(path)
            if value == "1" or (key == "proxy_arp" and everywhere == "1"):  # IPv4 ORs conf/all into each device
                found[(ifname, key)] = "all" if value != "1" else ifname
    if not found:
        return ok("proxy_arp and proxy_ndp are off")
    forwarding = _sysctl("ipv4/ip_forward")
    on_bridge = any(ifname == target.bridge for ifname, _ in found)
    described = ", ".join(f"net.{'ipv4' if key == 'proxy_arp' else 'ipv6'}.conf.{where}.{key}=1"
                          for (_, key), where in found.items())
    text = (f"{described} (ip_forward={forwarding}): the host answers ARP or neighbour solicitations for addresses "
            "it routes elsewhere" + (f", so VMs on {target.bridge} get the host's MAC for LAN addresses and their "
                                     "traffic goes through the host instead of macnat" if on_bridge else
                                     f", so the LAN may be told the host's MAC for addresses behind {target.wifi}"))
    fix = ("sysctl -w " + " ".join(sorted({f"net.{'ipv4' if key == 'proxy_arp' else 'ipv6'}.conf.{where}.{key}=0"
                                           for (_, key), where in found.items()})) +
           "   # and where it is set at boot: grep -rn proxy_ /etc/sysctl.conf /etc/sysctl.d /etc/network/interfaces")
    return (error if on_bridge else warning)(text, fix, topics.PROXY_ARP_SYSCTL,
                                             settings=[f"{where}.{key}" for (_, key), where in found.items()],
                                             ip_forward=forwarding)


def _ifupdown2(ctx) -> tuple[bool, bool]:
    """(ifupdown2 is installed, this is Proxmox VE)."""
    installed = any(ctx.system_path(p).exists() for p in ("/usr/sbin/ifreload", "/sbin/ifreload"))
    proxmox = ctx.system_path("/usr/bin/pveversion").exists()
    return installed, proxmox


@check(GROUP, "ifupdown2", "ifreload -a")
def ifupdown2(ctx, target):
    if not target.bridge:
        return None
    path = ctx.system_path(ifupdown.INTERFACES)
    port = uplink_names(target.wifi)[0]
    if not path.exists():
        return ok(f"no {ifupdown.INTERFACES}: nothing for ifreload -a to act on")
    stanza = ifupdown.parse(path, ctx.root).get(target.bridge)
    if stanza is None:
        return ok(f"{ifupdown.INTERFACES} has no stanza for {target.bridge}: ifreload -a leaves its ports alone")
    ports = " ".join(stanza.options.get("bridge-ports", [])) or "none"
    regex = stanza.option("bridge-ports-condone-regex")
    where = f"{stanza.file}, iface {target.bridge}"
    fix = f"in {where}: bridge-ports-condone-regex {ifupdown.PROXMOX_CONDONE_REGEX}"
    if ifupdown.listed(ports, port):
        return ok(f"{where} lists {port} in bridge-ports")
    if regex:
        if re.match(regex, port):
            return ok(f"{where}: bridge-ports-condone-regex {regex} keeps {port}")
        return error(f"{where}: bridge-ports-condone-regex {regex} does not match {port} (it replaces Proxmox's "
                     f"default {ifupdown.PROXMOX_CONDONE_REGEX}): ifreload -a (\"Apply Configuration\") takes {port} "
                     f"out of {target.bridge}", fix + "   # keep your own alternatives in it", topics.IFRELOAD,
                     regex=regex, ports=ports)
    installed, proxmox = _ifupdown2(ctx)
    if proxmox:
        return ok(f"{where} sets no bridge-ports-condone-regex: Proxmox VE's default {ifupdown.PROXMOX_CONDONE_REGEX} "
                  f"keeps {port}")
    text = (f"{where} has bridge-ports {ports} and no bridge-ports-condone-regex: ifupdown2's ifreload -a takes "
            f"{port} out of {target.bridge}, cutting the VMs off until macnat's manager puts it back")
    if installed:
        return error(text, fix, topics.IFRELOAD, ports=ports, ifupdown2=True)
    return warning(text + " (ifupdown2 is not installed now; Proxmox VE and Cumulus use it)", fix, topics.IFRELOAD,
                   ports=ports, ifupdown2=False)


def _nmcli_states() -> dict[str, str]:
    if not shutil.which("nmcli"):
        return {}
    proc = subprocess.run(["nmcli", "-t", "-f", "DEVICE,STATE", "device", "status"], capture_output=True, text=True)
    return dict(line.rsplit(":", 1) for line in proc.stdout.splitlines() if ":" in line) if proc.returncode == 0 else {}


NM_EXCEPT = ("   # and for good, in that [device] section: "
             "match-device=...;except:interface-name:vethmn*;except:interface-name:mnpeer*")


@check(GROUP, "networkmanager", "NetworkManager")
def networkmanager(ctx, target):
    files = nm.config_files(ctx.root)
    states = _nmcli_states()
    if not files and not states:
        return ok("NetworkManager is not installed (no configuration, no nmcli)")
    devices = [nm.Device(name, "veth", "veth") for name in uplink_names(target.wifi)]
    claims = {d.name: nm.claim(files, d) for d in devices}
    managed = {name: c.where for name, c in claims.items() if c and c.managed}
    managed |= {d.name: f"nmcli: {states[d.name]}" for d in devices if states.get(d.name, "unmanaged") != "unmanaged"}
    if managed:
        return warning("NetworkManager manages " + "; ".join(f"{name} ({where})" for name, where in managed.items()) +
                       ": it may activate a connection on macnat's uplink and take it out of the bridge",
                       "; ".join(f"nmcli device set {name} managed no" for name in managed) + NM_EXCEPT,
                       topics.NETWORKMANAGER, managed=managed)
    unmanaged = [c.where for c in claims.values() if c and not c.managed]
    return ok("; ".join(sorted(set(unmanaged))) if unmanaged else
              "no NetworkManager setting claims macnat's veth pair (its udev rules leave veth devices unmanaged)")
