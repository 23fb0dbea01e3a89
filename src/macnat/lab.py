"""The emulated Wi-Fi LAN: network namespaces that behave like a laptop on a Wi-Fi access point.

    mnlab-router  192.168.77.1, dnsmasq        mnlab-lanhost  192.168.77.20
        eth0                                       eth0
         |                                          |
      p-router ------------- apbr ------------- p-lanhost           mnlab-ap: the access point
                               |
                              air        nftables: what a 3-address AP does to a station
                               |
        mnlab-laptop:        wlan0  192.168.77.10 (the station)
                             vmbr0  (bridge) --- tap101 --- eth0  mnlab-vm1  (isc dhclient or dhcpcd)
                                             --- tap102 --- eth0  mnlab-vm2

With `second_network`, a second access point on another subnet (mnlab-ap2 with mnlab-router2
192.168.88.1 and mnlab-lanhost2 192.168.88.20) that the laptop can roam to: the station's `air` end
moves to that AP, as a station associates with another network, wlan0 gets another MAC (as with
NetworkManager's per-network random MAC) and the host another address.

The "air" port models a 3-address association: from the station the AP accepts only frames whose
source MAC is the associated station's (mac80211 puts the Ethernet source into the transmitter
address, and an AP drops frames from transmitters that are not associated); towards the station it
delivers unicast only when addressed to the station (group frames always). Each rule counts what it
drops. With the filter off the AP behaves like a 4-address (WDS) AP, where plain bridging works: the
same rules accept the lab's VMs' MACs behind the station as well, so both kinds cost the same per frame.
`mcast_to_ucast` models APs that deliver group frames as unicast to the station's MAC.

The laptop's Wi-Fi events are knobs too: flap() (down and up, as suspend/resume or rfkill do),
replug() (the interface deleted and created again: a new ifindex, as with a USB dongle), roam().
Three more behaviours of real access points, for `macnat doctor` to recognise: `ap_proxy_arp` (the AP
answers ARP for the listed addresses itself, with the station's MAC: hostapd's proxy_arp=1, which
sets the bridge port's proxy_arp_wifi and keeps neighbour entries from its DHCP snooping),
`ap_isolation` (client isolation: the station reaches the router only) and `arp_offload` (Wi-Fi
firmware that keeps every ARP not for the station's own address from the host). `chaddr_check` is the
strict network of issue #13: the AP drops the station's DHCP requests whose BOOTP chaddr is not the
station's MAC (DHCP snooping's "verify mac-address"), counted as `chaddr_mismatch`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from macnat.errors import MacnatError
from macnat import netns
from macnat.netns import Namespace, names

PREFIX = f"{netns.PREFIX}lab-"
STATE_DIR = Path("/run/macnat-lab" if netns.PREFIX == "mn" else f"/run/macnat-lab-{netns.PREFIX}")
SUBNET_PREFIXLEN = 24
AP_TABLE = "mnlab_ap"
DHCP_TIMEOUT = 8
IFUPDOWN2_DIR = Path(os.environ.get("MACNAT_IFUPDOWN2", "/var/cache/macnat-lab/ifupdown2"))


@dataclass(frozen=True)
class Host:
    ns: Namespace
    ifname: str
    mac: str
    ip: str | None  # static address; None for the VMs, which use DHCP
    ip6: str | None = None  # static IPv6 address when the lab serves IPv6


@dataclass(frozen=True)
class LanNetwork:
    """One access point with its LAN: a router (dnsmasq) and a LAN host."""

    key: str
    ap: Namespace
    router: Host
    lanhost: Host
    prefix4: str   # "192.168.77."
    prefix6: str   # "fd77:77::"

    @property
    def gateway(self) -> str:
        return self.router.ip

    @property
    def subnet(self) -> str:
        return f"{self.prefix4}0/{SUBNET_PREFIXLEN}"

    @property
    def laptop_ip(self) -> str:
        return f"{self.prefix4}10"

    @property
    def dhcp_range(self) -> tuple[str, str]:
        return f"{self.prefix4}100", f"{self.prefix4}199"

    def state_file(self, name: str) -> Path:
        """A file of this network's router in STATE_DIR: dnsmasq.log for the first, dnsmasq-b.log ..."""
        stem, dot, suffix = name.partition(".")
        return STATE_DIR / (name if self.key == "a" else f"{stem}-{self.key}{dot}{suffix}")

    def namespaces(self) -> list[Namespace]:
        return [self.ap, self.router.ns, self.lanhost.ns]


NETWORKS = {
    "a": LanNetwork("a", Namespace(PREFIX + "ap"),
                    Host(Namespace(PREFIX + "router"), "eth0", "02:4d:4e:00:00:01", "192.168.77.1", "fd77:77::1"),
                    Host(Namespace(PREFIX + "lanhost"), "eth0", "02:4d:4e:00:00:14", "192.168.77.20", "fd77:77::20"),
                    "192.168.77.", "fd77:77::"),
    "b": LanNetwork("b", Namespace(PREFIX + "ap2"),
                    Host(Namespace(PREFIX + "router2"), "eth0", "02:4d:4e:00:01:01", "192.168.88.1", "fd88:88::1"),
                    Host(Namespace(PREFIX + "lanhost2"), "eth0", "02:4d:4e:00:01:14", "192.168.88.20", "fd88:88::20"),
                    "192.168.88.", "fd88:88::"),
}
HOME = NETWORKS["a"]
AP, ROUTER, LANHOST = HOME.ap, HOME.router, HOME.lanhost
GATEWAY, IPV6_PREFIX, DHCP_RANGE = HOME.gateway, HOME.prefix6, HOME.dhcp_range
LAPTOP = Host(Namespace(PREFIX + "laptop"), "wlan0", "02:4d:4e:00:00:0a", HOME.laptop_ip)
BRIDGE = "vmbr0"
BRIDGE_MAC = "02:4d:4e:00:00:b0"
VMS = {
    "vm1": Host(Namespace(PREFIX + "vm1"), "eth0", "52:54:00:00:01:01", None),
    "vm2": Host(Namespace(PREFIX + "vm2"), "eth0", "52:54:00:00:01:02", None),
}
VM_PORTS = {"vm1": "tap101", "vm2": "tap102"}  # kept current by plug_vm, replug_vm and add_vm
STANDARD_VMS, STANDARD_PORTS = dict(VMS), dict(VM_PORTS)


@dataclass
class Knobs:
    ap_filter: bool = True
    mcast_to_ucast: bool = False
    ipv6: bool = False
    station_mac: str = LAPTOP.mac     # the MAC the AP has associated
    second_network: bool = False      # build network "b" to roam to
    network: str = "a"                # the network the station is associated with

    def networks(self) -> list[LanNetwork]:
        return [NETWORKS["a"], NETWORKS["b"]] if self.second_network else [NETWORKS["a"]]
    ap_proxy_arp: list[str] = field(default_factory=list)  # addresses the AP answers ARP for, as the station's
    ap_isolation: bool = False        # the AP lets the station talk to the router only
    arp_offload: bool = False         # only ARP for the station's own address reaches it
    chaddr_check: bool = False        # the AP drops the station's DHCP whose chaddr is not the station's MAC
    server_ignores_client_id: bool = False  # dnsmasq --dhcp-ignore-clid: leases by chaddr alone


def namespaces(knobs: Knobs | None = None) -> list[Namespace]:
    knobs = knobs or Knobs()
    return [*(ns for net in knobs.networks() for ns in net.namespaces()), LAPTOP.ns, *(vm.ns for vm in VMS.values())]


def _veth(ns_a: Namespace, if_a: str, ns_b: Namespace, if_b: str, mac_b: str | None = None) -> None:
    ns_a.ip("link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b.name)
    if mac_b:
        ns_b.ip("link", "set", if_b, "address", mac_b)


def _address(host: Host) -> None:
    host.ns.ip("addr", "add", f"{host.ip}/{SUBNET_PREFIXLEN}", "dev", host.ifname)


def up(knobs: Knobs | None = None) -> Knobs:
    """Build the lab, replacing any lab already there."""
    knobs = knobs or Knobs()
    down()
    STATE_DIR.mkdir(parents=True)
    try:
        _build(knobs)
    except BaseException:
        down()
        raise
    _save(knobs)
    return knobs


def _save(knobs: Knobs) -> None:
    (STATE_DIR / "knobs.json").write_text(json.dumps(asdict(knobs)))


def _build(knobs: Knobs) -> None:
    for ns in namespaces(knobs):
        Namespace.create(ns.name)
        if not knobs.ipv6:  # no DAD delays where IPv6 is only link-local chatter
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    for net in knobs.networks():
        net.ap.ip("link", "add", "apbr", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        for host, port in ((net.router, "p-router"), (net.lanhost, "p-lanhost")):
            _veth(net.ap, port, host.ns, host.ifname, host.mac)
            net.ap.ip("link", "set", port, "master", "apbr", "up")
        net.ap.ip("link", "set", "apbr", "up")
        for host in (net.router, net.lanhost):
            _address(host)
            host.ns.ip("link", "set", host.ifname, "up")
        net.lanhost.ns.ip("route", "add", "default", "via", net.gateway)
        if knobs.ipv6:
            for host in (net.router, net.lanhost):
                host.ns.ip("-6", "addr", "add", f"{host.ip6}/64", "dev", host.ifname, "nodad")
    current = NETWORKS[knobs.network]
    _associate(current, knobs.station_mac, create=True)
    set_ap(knobs)
    _configure_host(current)

    LAPTOP.ns.ip("link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
                 "forward_delay", "0", "stp_state", "0")
    LAPTOP.ns.ip("link", "set", BRIDGE, "up")
    for name, vm in VMS.items():
        plug_vm(name, VM_PORTS[name])

    _write_dhclient_files()
    for net in knobs.networks():
        _start_dnsmasq(net, knobs)


def _associate(net: LanNetwork, mac: str, create: bool = False) -> None:
    """The station joins `net`'s AP: its `air` end (created with wlan0 when `create`) in the AP's bridge."""
    if create:
        _veth(net.ap, "air", LAPTOP.ns, LAPTOP.ifname, mac)
    net.ap.ip("link", "set", "air", "master", "apbr", "up")
    LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "up")


def _configure_host(net: LanNetwork) -> None:
    """What the host's network manager does once associated: its address and default route."""
    LAPTOP.ns.ip("addr", "replace", f"{net.laptop_ip}/{SUBNET_PREFIXLEN}", "dev", LAPTOP.ifname)
    LAPTOP.ns.ip("route", "replace", "default", "via", net.gateway, "dev", LAPTOP.ifname)


# ---- the laptop's Wi-Fi events ------------------------------------------------------------------

def flap(down_seconds: float = 0.5) -> None:
    """wlan0 down and up again (suspend/resume, rfkill); the host's network manager restores its route."""
    LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "down")
    time.sleep(down_seconds)
    LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "up")
    _configure_host(NETWORKS[current_knobs().network])


def unplug() -> None:
    """The Wi-Fi interface disappears (a USB dongle pulled, a driver unloaded)."""
    LAPTOP.ns.ip("link", "del", LAPTOP.ifname)


def plug(mac: str | None = None) -> None:
    """The Wi-Fi interface appears again: a new ifindex, the same name; associated and configured."""
    knobs = current_knobs()
    knobs.station_mac = mac or knobs.station_mac
    net = NETWORKS[knobs.network]
    _associate(net, knobs.station_mac, create=True)
    set_ap(knobs)
    _configure_host(net)


def replug(mac: str | None = None, absent_seconds: float = 0.5) -> None:
    """unplug(), then plug() again after `absent_seconds`."""
    unplug()
    time.sleep(absent_seconds)
    plug(mac)


def roam(network: str, mac: str | None = None) -> LanNetwork:
    """The laptop moves to another network: it leaves its AP, associates with `network`'s AP (with
    another MAC, as NetworkManager's per-network random MAC does) and gets that network's address."""
    knobs = current_knobs()
    if network not in {net.key for net in knobs.networks()}:
        raise MacnatError(f"the lab has no network '{network}' (lab up with second_network)")
    old, new = NETWORKS[knobs.network], NETWORKS[network]
    LAPTOP.ns.ip("addr", "flush", "dev", LAPTOP.ifname)
    if old is not new:
        old.ap.ip("link", "set", "air", "netns", new.ap.name)
    if mac:
        LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "down")
        LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "address", mac)
        knobs.station_mac = mac
    knobs.network = network
    _associate(new, knobs.station_mac)
    set_ap(knobs)  # after _associate: proxy ARP is a knob of the station's port in the new AP's bridge
    _configure_host(new)
    return new


def laptop_ip() -> str:
    return NETWORKS[current_knobs().network].laptop_ip


def _start_dnsmasq(net: LanNetwork, knobs: Knobs) -> None:
    first, last = net.dhcp_range
    pidfile = net.state_file("dnsmasq.pid")
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        f"--interface={net.router.ifname}", "--bind-interfaces", "--dhcp-authoritative", "--no-ping",
        f"--dhcp-range={first},{last},255.255.255.0,1h",
        f"--dhcp-option=option:router,{net.gateway}",
        f"--dhcp-leasefile={net.state_file('dnsmasq.leases')}", "--log-dhcp", "--log-facility=-",
        f"--pid-file={pidfile}",
    ]
    if knobs.server_ignores_client_id:
        argv.append("--dhcp-ignore-clid")
    if knobs.ipv6:
        # RA with the A flag (SLAAC) and the M flag (DHCPv6): VMs get an address of each kind.
        argv += ["--enable-ra", f"--dhcp-range={net.prefix6}100,{net.prefix6}1ff,slaac,64,1h"]
    net.router.ns.spawn(*argv, log=net.state_file("dnsmasq.log"))
    deadline = time.monotonic() + 5
    while not pidfile.exists():
        if time.monotonic() > deadline:
            raise MacnatError(f"dnsmasq did not start in {net.router.ns.name}: see {net.state_file('dnsmasq.log')}")
        time.sleep(0.02)


# A dhclient-script of our own: it sets only address and route, so the lab never writes the
# machine's /etc/resolv.conf. Exit 1 on TIMEOUT so dhclient never falls back to an old lease.
DHCLIENT_SCRIPT = """#!/bin/sh
case "$reason" in
  PREINIT) ip link set dev "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    if [ "$old_ip_address" != "$new_ip_address" ]; then ip -4 addr flush dev "$interface"; fi
    ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface"
    if [ -n "$new_routers" ]; then ip route replace default via "${new_routers%% *}" dev "$interface"; fi ;;
  EXPIRE|FAIL|RELEASE|STOP) ip -4 addr flush dev "$interface" ;;
  BOUND6|RENEW6|REBIND6|REBOOT6)
    if [ -n "$old_ip6_address" ] && [ "$old_ip6_address" != "$new_ip6_address" ]; then
      ip -6 addr del "$old_ip6_address/$old_ip6_prefixlen" dev "$interface"; fi
    ip -6 addr replace "$new_ip6_address/$new_ip6_prefixlen" dev "$interface" ;;
  EXPIRE6|RELEASE6|STOP6) ip -6 addr del "$old_ip6_address/$old_ip6_prefixlen" dev "$interface" ;;
  TIMEOUT|PREINIT6) [ "$reason" = TIMEOUT ] && exit 1 ;;
esac
exit 0
"""


def plug_vm(name: str, port: str) -> None:
    """Connect a VM's eth0 to the bridge through a new port (a veth pair, the port's end in the laptop)."""
    vm = VMS[name]
    _veth(LAPTOP.ns, port, vm.ns, vm.ifname, vm.mac)
    LAPTOP.ns.ip("link", "set", port, "master", BRIDGE, "up")
    vm.ns.ip("link", "set", vm.ifname, "up")
    VM_PORTS[name] = port


def replug_vm(name: str, port: str) -> None:
    """The VM comes back on another bridge port, with the same MAC, as a restarted VM gets a new tap."""
    LAPTOP.ns.ip("link", "del", VM_PORTS[name])  # its peer, the VM's eth0, goes with it
    plug_vm(name, port)


def add_vm(name: str, mac: str, port: str | None = None) -> Host:
    """One more VM on the bridge, as if it had just started (`remove_vm` or `down` removes it); its port
    is `port`, or the next free tapNNN."""
    port = port or next(f"tap{n}" for n in range(103, 1000) if f"tap{n}" not in VM_PORTS.values())
    vm = Host(Namespace(PREFIX + name), "eth0", mac, None)
    Namespace.create(vm.ns.name)
    lab_knobs = current_knobs()
    if not lab_knobs.ipv6:
        vm.ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
    VMS[name] = vm
    plug_vm(name, port)
    if not lab_knobs.ap_filter:
        set_ap(lab_knobs)   # a 4-address AP accepts the new VM's MAC too
    return vm


def remove_vm(name: str) -> None:
    """Remove a VM that add_vm made: its DHCP client, namespace and bridge port."""
    release(name)
    LAPTOP.ns.run("ip", "link", "del", VM_PORTS.pop(name), check=False)
    VMS.pop(name).ns.delete()


def _write_dhclient_files() -> None:
    script = STATE_DIR / "dhclient-script"
    script.write_text(DHCLIENT_SCRIPT)
    script.chmod(0o755)


def dhcp(vm: str, renew_after: int | None = None, rebind_after: int | None = None, timeout: int = DHCP_TIMEOUT,
         lease: str | None = None, foreground: bool = False) -> str | None:
    """Run the VM's real DHCP client once; the leased address, or None if it got none in `timeout` s.

    On success dhclient stays in the background and renews (after `renew_after` seconds if given,
    else at the server's T1) and rebinds (after `rebind_after`, else at T2), as in a real VM. `lease`:
    a lease statement the client starts from (it asks for that address first, INIT-REBOOT).
    `foreground`: dhclient runs with -d, so that dhcp_log() keeps what it prints after the first lease
    ("DHCPACK of" for each lease it takes: its script is not run for a rebind that changes nothing).
    """
    release(vm)
    if lease:
        (STATE_DIR / f"dhclient-{vm}.leases").write_text(lease)
    conf = (f"timeout {timeout};\nretry 1;\ninitial-interval 1;\nbackoff-cutoff 2;\n"
            "request subnet-mask, broadcast-address, routers;\n"
            + (f"supersede dhcp-renewal-time {renew_after};\n" if renew_after else "")
            + (f"supersede dhcp-rebinding-time {rebind_after};\n" if rebind_after else ""))
    if foreground:
        VMS[vm].ns.spawn(*_dhclient_argv(vm, "dhclient", ["-d"], conf), log=STATE_DIR / f"dhclient-{vm}.log")
        deadline = time.monotonic() + timeout
        while not vm_ip(vm) and time.monotonic() < deadline:
            time.sleep(0.05)
        return vm_ip(vm)
    return vm_ip(vm) if _dhclient(vm, "dhclient", [], conf, timeout) else None


def _dhclient_argv(vm: str, kind: str, options: list[str], conf: str) -> list[str]:
    """isc dhclient's command line for the VM (`conf` written to its file), its files named after `kind`."""
    conf_path = STATE_DIR / f"{kind}-{vm}.conf"
    conf_path.write_text(conf)
    return ["dhclient", *options, "-v", "-cf", str(conf_path), "-sf", str(STATE_DIR / "dhclient-script"),
            "-pf", str(STATE_DIR / f"{kind}-{vm}.pid"), "-lf", str(STATE_DIR / f"{kind}-{vm}.leases"), VMS[vm].ifname]


def _dhclient(vm: str, kind: str, options: list[str], conf: str, timeout: int = DHCP_TIMEOUT) -> bool:
    """Run isc dhclient once in the VM, its files named after `kind`; True when it got a lease."""
    proc = VMS[vm].ns.run(*_dhclient_argv(vm, kind, [*options, "-1"], conf), check=False, timeout=timeout + 10)
    with open(STATE_DIR / f"{kind}-{vm}.log", "a") as log:
        log.write(proc.stdout + proc.stderr)
    return proc.returncode == 0


def dhcp_all() -> dict[str, str | None]:
    """dhcp() for every VM at once, as VMs booting together do."""
    with ThreadPoolExecutor(len(VMS)) as pool:
        return dict(zip(VMS, pool.map(dhcp, VMS), strict=True))


def dhcp6(vm: str) -> str | None:
    """Run the VM's DHCPv6 client (isc dhclient -6) once; the leased address, or None.

    The client identifies itself with a DUID-LL made of the VM's own MAC, so the server's lease shows
    whether the DUID crossed the Wi-Fi unchanged.
    """
    host = VMS[vm]
    _stop_client(vm, "dhclient6")
    deadline = time.monotonic() + 10  # dhclient -6 needs a link-local address that passed DAD
    while host.ns.ip("-6", "addr", "show", "dev", host.ifname, "scope", "link", "tentative").strip():
        if time.monotonic() > deadline:
            raise MacnatError(f"{vm}'s link-local address stayed tentative")
        time.sleep(0.1)
    if not _dhclient(vm, "dhclient6", ["-6", "-D", "LL"], f"timeout {DHCP_TIMEOUT};\nretry 1;\ninitial-interval 1;\n"):
        return None
    return _wait_address(vm, lambda info: info["prefixlen"] == 128, "DHCPv6")  # IA_NA addresses are /128


def _stop_client(vm: str, kind: str) -> None:
    pidfile = STATE_DIR / f"{kind}-{vm}.pid"
    if pidfile.exists():
        VMS[vm].ns.run("kill", pidfile.read_text().strip(), check=False)
        pidfile.unlink()
    (STATE_DIR / f"{kind}-{vm}.leases").unlink(missing_ok=True)


DHCPCD_CONF = """# dhcpcd as a lab VM's network manager: IPv4 (the kernel does SLAAC); no hooks
ipv4only
noipv4ll
option subnet_mask, routers
"""


def start_dhcpcd(vm: str, duid: bool = False) -> subprocess.Popen:
    """Run dhcpcd in the VM as a guest's network manager would: it asks for a lease at start and again
    whenever its carrier comes back (how guests learn that the host changed networks). Its /run and
    /var/lib/dhcpcd are private (a mount namespace of its own): the VMs' state stays apart, and off
    the machine. Its client identifier is type 1 and its MAC; with `duid`, an RFC 4361 one (IAID and
    DUID, type 255), as dhcpcd's own dhcpcd.conf sets it."""
    release(vm)
    conf = STATE_DIR / f"dhcpcd-{vm}.conf"
    conf.write_text(DHCPCD_CONF + ("duid\n" if duid else ""))
    host = VMS[vm]
    # the configuration lives in STATE_DIR, under /run: it is read before /run becomes the private tmpfs
    script = (f'conf="$(cat {conf})" && mount -t tmpfs none /run && mount -t tmpfs none /var/lib/dhcpcd && '
              f'printf "%s\\n" "$conf" >/run/dhcpcd.conf && exec dhcpcd -B -f /run/dhcpcd.conf -c /bin/true {host.ifname}')
    return host.ns.spawn("unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                         log=STATE_DIR / f"dhcpcd-{vm}.log")


def wait_lease(vm: str, network: str | None = None, timeout: float = 20) -> str:
    """The VM's IPv4 address in `network`'s subnet (default: the laptop's), once its client has one."""
    prefix = NETWORKS[network or current_knobs().network].prefix4
    deadline = time.monotonic() + timeout
    while True:
        ip = vm_ip(vm)
        if ip and ip.startswith(prefix):
            return ip
        if time.monotonic() > deadline:
            raise MacnatError(f"{vm} has no address in {prefix}0/24 after {timeout:g} s (it has {ip})")
        time.sleep(0.05)


def ifreload(interfaces: str) -> subprocess.CompletedProcess:
    """Debian's ifupdown2 `ifreload -a` in the laptop's namespace, on `interfaces` (the text of an
    /etc/network/interfaces): what Proxmox's "Apply Configuration" runs. ifupdown2 is unpacked by
    setup.sh, not installed, and runs in a mount namespace of its own with a private /run and /var/tmp
    and its configuration pointing at the lab's files: it never sees the machine's own network."""
    program = IFUPDOWN2_DIR / "usr/share/ifupdown2/ifupdown2"
    conf = IFUPDOWN2_DIR / "usr/share/ifupdown2/etc/network/ifupdown2/ifupdown2.conf"
    if not program.exists() or not conf.exists():
        raise MacnatError(f"Debian's ifupdown2 is not unpacked in {IFUPDOWN2_DIR}: run ./setup.sh")
    (STATE_DIR / "interfaces").write_text(interfaces)
    own_conf = STATE_DIR / "ifupdown2.conf"
    lines = [ln for ln in conf.read_text().splitlines()
             if not ln.startswith(("default_interfaces_configfile=", "state_dir="))]
    own_conf.write_text("\n".join([*lines, "default_interfaces_configfile=/var/tmp/interfaces",
                                    "state_dir=/var/tmp/network/"]) + "\n")
    # The private /run hides STATE_DIR: what ifupdown2 reads goes to the private /var/tmp first. It
    # takes its command from the name it runs under, hence the ifreload link.
    script = (f"mount --bind {own_conf} {conf} && mount -t tmpfs none /var/tmp && "
              f"cp {STATE_DIR / 'interfaces'} /var/tmp/interfaces && ln -s {program} /var/tmp/ifreload && "
              f"mount -t tmpfs none /run && mkdir /run/network && exec python3 /var/tmp/ifreload -a")
    return LAPTOP.ns.run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, check=False,
                         timeout=60)


def release(vm: str) -> None:
    """Stop the VM's DHCP client and forget its lease, so the next dhcp() starts from scratch."""
    _stop_client(vm, "dhclient")
    VMS[vm].ns.ip("-4", "addr", "flush", "dev", VMS[vm].ifname)


def dhcp_log(vm: str) -> str:
    """What the VM's dhclient printed (every run since the lab came up)."""
    path = STATE_DIR / f"dhclient-{vm}.log"
    return path.read_text() if path.exists() else ""


def server_leases(network: str | None = None) -> list[dict[str, str]]:
    """The leases the router's dnsmasq holds: address, chaddr and client identifier ("*": none)."""
    path = NETWORKS[network or current_knobs().network].state_file("dnsmasq.leases")
    lines = path.read_text().splitlines() if path.exists() else []
    return [dict(zip(("expiry", "chaddr", "ip", "hostname", "client_id"), line.split())) for line in lines]


def vm_ip(vm: str) -> str | None:
    host = VMS[vm]
    addrs = json.loads(host.ns.ip("-j", "-4", "addr", "show", "dev", host.ifname))
    return next((info["local"] for link in addrs for info in link.get("addr_info", [])), None)


def _ipv6_addresses(vm: str) -> list[dict]:
    """The VM's global IPv6 addresses that passed DAD, as `ip -j addr` describes them."""
    host = VMS[vm]
    out = json.loads(host.ns.ip("-j", "-6", "addr", "show", "dev", host.ifname, "scope", "global"))
    return [info for link in out for info in link.get("addr_info", []) if "local" in info and not info.get("tentative")]


def vm_ip6(vm: str) -> list[str]:
    """The VM's global IPv6 addresses that passed DAD (SLAAC and DHCPv6)."""
    return [info["local"] for info in _ipv6_addresses(vm)]


def wait_slaac(vm: str) -> str:
    """The VM's SLAAC address in the lab prefix, once it has one (RA received, DAD passed)."""
    return _wait_address(vm, lambda info: info["prefixlen"] == 64, "SLAAC")


def _wait_address(vm: str, wanted, kind: str, timeout: float = 20) -> str:
    """A global IPv6 address of the VM in the prefix of the network the laptop is on."""
    prefix = NETWORKS[current_knobs().network].prefix6
    deadline = time.monotonic() + timeout
    while True:
        for info in _ipv6_addresses(vm):
            if info["local"].startswith(prefix) and wanted(info):
                return info["local"]
        if time.monotonic() > deadline:
            raise MacnatError(f"{vm} got no {kind} address in {prefix}/64 within {timeout:g} s")
        time.sleep(0.1)


def set_ap(knobs: Knobs) -> None:
    """Install the access points' behaviour towards the station (replacing what was there)."""
    rules = []
    if knobs.mcast_to_ucast:
        rules.append(f'oifname "air" meta pkttype {{ broadcast, multicast }} ether daddr set {knobs.station_mac}')
    if knobs.ap_isolation:
        rules += ['iifname "air" oifname != "p-router" drop', 'oifname "air" iifname != "p-router" drop']
    if knobs.arp_offload:
        rules.append(f'oifname "air" arp daddr ip != {NETWORKS[knobs.network].laptop_ip} drop')
    if knobs.chaddr_check:  # BOOTP chaddr: 28 bytes into the message, after the 8-byte UDP header
        station = "0x" + knobs.station_mac.replace(":", "")
        rules.append(f'iifname "air" udp sport 68 udp dport 67 @th,288,48 != {station} counter name "chaddr_mismatch" drop')
    # The same two rules for both kinds of AP, so each costs the same per frame: a 3-address AP accepts
    # the associated station's MAC only, a 4-address (WDS) AP the MACs behind the station as well.
    station_side = [knobs.station_mac] + ([] if knobs.ap_filter else [vm.mac for vm in VMS.values()])
    rules.append('iifname "air" ether saddr != @station_side counter name "from_unassociated" drop')
    rules.append('oifname "air" meta pkttype != { broadcast, multicast } '
                 'ether daddr != @station_side counter name "to_unassociated" drop')
    body = "\n".join(f"    {r}" for r in rules)
    for net in knobs.networks():
        net.ap.run("nft", "-f", "-", input=f"""
table bridge {AP_TABLE}
delete table bridge {AP_TABLE}
table bridge {AP_TABLE} {{
  counter from_unassociated {{}}
  counter to_unassociated {{}}
  counter chaddr_mismatch {{}}
  set station_side {{ type ether_addr; elements = {{ {", ".join(station_side)} }}; }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
{body}
  }}
}}
""")
    _set_ap_proxy_arp(knobs)
    if STATE_DIR.exists():
        _save(knobs)


def _set_ap_proxy_arp(knobs: Knobs) -> None:
    """What hostapd's proxy_arp=1 does on the AP's bridge: the bridge answers ARP for the neighbour
    entries it holds on the station's behalf (br_do_proxy_suppress_arp) instead of asking the station."""
    ap = NETWORKS[knobs.network].ap
    ap.ip("link", "set", "air", "type", "bridge_slave", "proxy_arp_wifi", "on" if knobs.ap_proxy_arp else "off")
    ap.ip("neigh", "flush", "dev", "apbr", "nud", "permanent")
    for ip in knobs.ap_proxy_arp:
        ap.ip("neigh", "replace", ip, "lladdr", knobs.station_mac, "dev", "apbr", "nud", "permanent")


def reassociate(mac: str) -> None:
    """The station comes back with another MAC (as with MAC randomisation) and the AP associates it."""
    LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "address", mac)
    current = current_knobs()
    current.station_mac = mac
    set_ap(current)


def ap_drops() -> dict[str, int]:
    """Frames the station's AP dropped: from unassociated source MACs, unicast to MACs other than the station's, and
    (chaddr_check) DHCP whose chaddr is not the station's MAC."""
    ap = NETWORKS[current_knobs().network].ap
    out = json.loads(ap.run("nft", "-j", "list", "counters", "table", "bridge", AP_TABLE).stdout)
    return {item["counter"]["name"]: item["counter"]["packets"] for item in out["nftables"] if "counter" in item}


def knobs() -> Knobs | None:
    path = STATE_DIR / "knobs.json"
    return Knobs(**json.loads(path.read_text())) if path.exists() else None


def current_knobs() -> Knobs:
    return knobs() or Knobs()


def is_up() -> bool:
    return all(ns.exists() for ns in namespaces(current_knobs()))


def down() -> None:
    """Remove every lab namespace (and the processes in them) and the lab's files."""
    for table, standard in ((VMS, STANDARD_VMS), (VM_PORTS, STANDARD_PORTS)):  # add_vm's VMs go with the lab
        table.clear()
        table.update(standard)
    for name in names():
        if name.startswith(PREFIX):
            Namespace(name).delete()
    shutil.rmtree(STATE_DIR, ignore_errors=True)


def ping(ns: Namespace, target: str, count: int = 1, timeout: float = 2) -> bool:
    """True when every one of `count` echo requests was answered."""
    proc = ns.run("ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(timeout), target,
                  check=False, timeout=count * 0.2 + timeout + 5)
    return proc.returncode == 0


def neighbours(ns: Namespace) -> dict[str, str]:
    """IP -> MAC of the namespace's neighbour table (reachable or stale entries only)."""
    out = json.loads(ns.ip("-j", "neigh", "show"))
    return {n["dst"]: n["lladdr"] for n in out if "lladdr" in n}


# The CLI beside this interpreter: the venv's console script, as a user runs it.
MACNAT = str(Path(sys.executable).parent / "macnat")


def macnat(*args: str, ns: Namespace | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the macnat CLI (by default in the laptop's namespace, as a user on the laptop would)."""
    proc = subprocess.run((ns or LAPTOP.ns).exec_argv(MACNAT, *args), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise MacnatError(f"macnat {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class RunningManager:
    """`macnat attach wlan0 vmbr0 ...` running in the laptop's namespace, its log in a file."""

    def __init__(self, *args: str, log: Path, executable: str = MACNAT, bridge: str | None = BRIDGE,
                 env: dict[str, str] | None = None):
        self.log = log
        self.proc = LAPTOP.ns.spawn(executable, "attach", LAPTOP.ifname, *([bridge] if bridge else []), *args,
                                    log=log, env=env)
        # Ready once the manager says it is managing: it logs that after adopting or learning the tables
        # (the lock, and so `macnat status`, names this PID earlier, from before the exec).
        deadline = time.monotonic() + 30
        while "managing wlan0 <-> " not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise MacnatError(f"macnat attach did not come up: {self.text().strip()}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def status() -> dict:
    """What is up, for `macnat lab status`."""
    if not is_up():
        return {"up": False, "namespaces": [n for n in names() if n.startswith(PREFIX)]}
    return {
        "up": True,
        "knobs": asdict(current_knobs()),
        "ap_drops": ap_drops(),
        "laptop": {"wifi": LAPTOP.ifname, "mac": current_knobs().station_mac, "ip": laptop_ip(), "bridge": BRIDGE},
        "vms": {name: {"mac": vm.mac, "ip": vm_ip(name), "ip6": vm_ip6(name), "ns": vm.ns.name}
                for name, vm in VMS.items()},
        "lan": {"router": ROUTER.ip, "lanhost": LANHOST.ip},
    }
