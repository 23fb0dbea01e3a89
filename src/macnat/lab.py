"""The emulated Wi-Fi LAN: network namespaces that behave like a laptop on a Wi-Fi access point.

    mnlab-router  192.168.77.1, dnsmasq        mnlab-lanhost  192.168.77.20
        eth0                                       eth0
         |                                          |
      p-router ------------- apbr ------------- p-lanhost           mnlab-ap: the access point
                               |
                              air        nftables: what a 3-address AP does to a station
                               |
        mnlab-laptop:        wlan0  192.168.77.10 (the station)
                             vmbr0  (bridge) --- tap101 --- eth0  mnlab-vm1  (isc dhclient)
                                             --- tap102 --- eth0  mnlab-vm2  (isc dhclient)

The "air" port models a 3-address association: from the station the AP accepts only frames whose
source MAC is the associated station's (mac80211 puts the Ethernet source into the transmitter
address, and an AP drops frames from transmitters that are not associated); towards the station it
delivers unicast only when addressed to the station (group frames always). Each rule counts what it
drops. With the filter off the AP behaves like a 4-address (WDS) AP, where plain bridging works.
`mcast_to_ucast` models APs that deliver group frames as unicast to the station's MAC.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from macnat.errors import MacnatError
from macnat import netns
from macnat.netns import Namespace, names

PREFIX = f"{netns.PREFIX}lab-"
STATE_DIR = Path("/run/macnat-lab" if netns.PREFIX == "mn" else f"/run/macnat-lab-{netns.PREFIX}")
SUBNET_PREFIXLEN = 24
GATEWAY = "192.168.77.1"
DHCP_RANGE = ("192.168.77.100", "192.168.77.199")
IPV6_PREFIX = "fd77:77::"
AP_TABLE = "mnlab_ap"
DHCP_TIMEOUT = 8


@dataclass(frozen=True)
class Host:
    ns: Namespace
    ifname: str
    mac: str
    ip: str | None  # static address; None for the VMs, which use DHCP
    ip6: str | None = None  # static IPv6 address when the lab serves IPv6


AP = Namespace(PREFIX + "ap")
ROUTER = Host(Namespace(PREFIX + "router"), "eth0", "02:4d:4e:00:00:01", GATEWAY, IPV6_PREFIX + "1")
LANHOST = Host(Namespace(PREFIX + "lanhost"), "eth0", "02:4d:4e:00:00:14", "192.168.77.20", IPV6_PREFIX + "20")
LAPTOP = Host(Namespace(PREFIX + "laptop"), "wlan0", "02:4d:4e:00:00:0a", "192.168.77.10")
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


def namespaces() -> list[Namespace]:
    return [AP, ROUTER.ns, LANHOST.ns, LAPTOP.ns, *(vm.ns for vm in VMS.values())]


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
    (STATE_DIR / "knobs.json").write_text(json.dumps(asdict(knobs)))
    return knobs


def _build(knobs: Knobs) -> None:
    for ns in namespaces():
        Namespace.create(ns.name)
        if not knobs.ipv6:  # no DAD delays where IPv6 is only link-local chatter
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    AP.ip("link", "add", "apbr", "type", "bridge", "forward_delay", "0", "stp_state", "0")
    for host, port in ((ROUTER, "p-router"), (LANHOST, "p-lanhost"), (LAPTOP, "air")):
        _veth(AP, port, host.ns, host.ifname, host.mac)
        AP.ip("link", "set", port, "master", "apbr", "up")
    AP.ip("link", "set", "apbr", "up")
    set_ap(knobs)

    for host in (ROUTER, LANHOST, LAPTOP):
        _address(host)
        host.ns.ip("link", "set", host.ifname, "up")
        if host is not ROUTER:
            host.ns.ip("route", "add", "default", "via", GATEWAY)
    if knobs.ipv6:
        for host in (ROUTER, LANHOST):
            host.ns.ip("-6", "addr", "add", f"{host.ip6}/64", "dev", host.ifname, "nodad")

    LAPTOP.ns.ip("link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
                 "forward_delay", "0", "stp_state", "0")
    LAPTOP.ns.ip("link", "set", BRIDGE, "up")
    for name, vm in VMS.items():
        plug_vm(name, VM_PORTS[name])

    _write_dhclient_files()
    _start_dnsmasq(knobs)


def _start_dnsmasq(knobs: Knobs) -> None:
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        f"--interface={ROUTER.ifname}", "--bind-interfaces", "--dhcp-authoritative", "--no-ping",
        f"--dhcp-range={DHCP_RANGE[0]},{DHCP_RANGE[1]},255.255.255.0,1h",
        f"--dhcp-option=option:router,{GATEWAY}",
        f"--dhcp-leasefile={STATE_DIR / 'dnsmasq.leases'}", "--log-dhcp", "--log-facility=-",
        f"--pid-file={STATE_DIR / 'dnsmasq.pid'}",
    ]
    if knobs.ipv6:
        # RA with the A flag (SLAAC) and the M flag (DHCPv6): VMs get an address of each kind.
        argv += ["--enable-ra", f"--dhcp-range={IPV6_PREFIX}100,{IPV6_PREFIX}1ff,slaac,64,1h"]
    ROUTER.ns.spawn(*argv, log=STATE_DIR / "dnsmasq.log")
    deadline = time.monotonic() + 5
    while not (STATE_DIR / "dnsmasq.pid").exists():
        if time.monotonic() > deadline:
            raise MacnatError(f"dnsmasq did not start in {ROUTER.ns.name}: see {STATE_DIR / 'dnsmasq.log'}")
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


def add_vm(name: str, mac: str, port: str) -> Host:
    """One more VM on the bridge, as if it had just started (`remove_vm` or `down` removes it)."""
    vm = Host(Namespace(PREFIX + name), "eth0", mac, None)
    Namespace.create(vm.ns.name)
    if not (knobs() or Knobs()).ipv6:
        vm.ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
    VMS[name] = vm
    plug_vm(name, port)
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


def dhcp(vm: str, renew_after: int | None = None) -> str | None:
    """Run the VM's real DHCP client once; the leased address, or None if it got none in DHCP_TIMEOUT.

    On success dhclient stays in the background and renews (after `renew_after` seconds if given,
    else at the server's T1), as in a real VM.
    """
    release(vm)
    conf = (f"timeout {DHCP_TIMEOUT};\nretry 1;\ninitial-interval 1;\nbackoff-cutoff 2;\n"
            "request subnet-mask, broadcast-address, routers;\n"
            + (f"supersede dhcp-renewal-time {renew_after};\n" if renew_after else ""))
    return vm_ip(vm) if _dhclient(vm, "dhclient", [], conf) else None


def _dhclient(vm: str, kind: str, options: list[str], conf: str) -> bool:
    """Run isc dhclient once in the VM, its files named after `kind`; True when it got a lease."""
    host = VMS[vm]
    conf_path = STATE_DIR / f"{kind}-{vm}.conf"
    conf_path.write_text(conf)
    proc = host.ns.run("dhclient", *options, "-1", "-v", "-cf", str(conf_path),
                       "-sf", str(STATE_DIR / "dhclient-script"),
                       "-pf", str(STATE_DIR / f"{kind}-{vm}.pid"),
                       "-lf", str(STATE_DIR / f"{kind}-{vm}.leases"), host.ifname,
                       check=False, timeout=DHCP_TIMEOUT + 10)
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


def release(vm: str) -> None:
    """Stop the VM's DHCP client and forget its lease, so the next dhcp() starts from scratch."""
    _stop_client(vm, "dhclient")
    VMS[vm].ns.ip("-4", "addr", "flush", "dev", VMS[vm].ifname)


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


def _wait_address(vm: str, wanted, kind: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for info in _ipv6_addresses(vm):
            if info["local"].startswith(IPV6_PREFIX) and wanted(info):
                return info["local"]
        if time.monotonic() > deadline:
            raise MacnatError(f"{vm} got no {kind} address in {IPV6_PREFIX}/64 within {timeout:g} s")
        time.sleep(0.1)


def set_ap(knobs: Knobs) -> None:
    """Install the access point's behaviour towards the station (replacing what was there)."""
    rules = []
    if knobs.mcast_to_ucast:
        rules.append(f'oifname "air" meta pkttype {{ broadcast, multicast }} ether daddr set {knobs.station_mac}')
    if knobs.ap_filter:
        rules.append(f'iifname "air" ether saddr != {knobs.station_mac} counter name "from_unassociated" drop')
        rules.append(f'oifname "air" meta pkttype != {{ broadcast, multicast }} '
                     f'ether daddr != {knobs.station_mac} counter name "to_unassociated" drop')
    body = "\n".join(f"    {r}" for r in rules)
    AP.run("nft", "-f", "-", input=f"""
table bridge {AP_TABLE}
delete table bridge {AP_TABLE}
table bridge {AP_TABLE} {{
  counter from_unassociated {{}}
  counter to_unassociated {{}}
  chain forward {{
    type filter hook forward priority 0; policy accept;
{body}
  }}
}}
""")
    if STATE_DIR.exists():
        (STATE_DIR / "knobs.json").write_text(json.dumps(asdict(knobs)))


def reassociate(mac: str) -> None:
    """The station comes back with another MAC (as with MAC randomisation) and the AP associates it."""
    LAPTOP.ns.ip("link", "set", LAPTOP.ifname, "address", mac)
    current = knobs() or Knobs()
    current.station_mac = mac
    set_ap(current)


def ap_drops() -> dict[str, int]:
    """Frames the AP dropped: from unassociated source MACs, and unicast to MACs other than the station's."""
    out = json.loads(AP.run("nft", "-j", "list", "counters", "table", "bridge", AP_TABLE).stdout)
    return {item["counter"]["name"]: item["counter"]["packets"] for item in out["nftables"] if "counter" in item}


def knobs() -> Knobs | None:
    path = STATE_DIR / "knobs.json"
    return Knobs(**json.loads(path.read_text())) if path.exists() else None


def is_up() -> bool:
    return all(ns.exists() for ns in namespaces())


def down() -> None:
    """Remove every lab namespace (and the processes in them) and the lab's files."""
    present = set(names())
    for ns in namespaces():
        if ns.name in present:
            ns.delete()
    for table, standard in ((VMS, STANDARD_VMS), (VM_PORTS, STANDARD_PORTS)):  # add_vm's VMs go with the lab
        table.clear()
        table.update(standard)
    for name in present:  # leftovers of an older lab layout
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

    def __init__(self, *args: str, log: Path, executable: str = MACNAT):
        self.log = log
        self.proc = LAPTOP.ns.spawn(executable, "attach", LAPTOP.ifname, BRIDGE, *args, log=log)
        # Ready once the manager says it is managing: it logs that after adopting or learning the tables
        # (the lock, and so `macnat status`, names this PID earlier, from before the exec).
        deadline = time.monotonic() + 30
        while "macnat: managing " not in self.text():
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
        "knobs": asdict(knobs() or Knobs()),
        "ap_drops": ap_drops(),
        "laptop": {"wifi": LAPTOP.ifname, "mac": LAPTOP.mac, "ip": LAPTOP.ip, "bridge": BRIDGE},
        "vms": {name: {"mac": vm.mac, "ip": vm_ip(name), "ip6": vm_ip6(name), "ns": vm.ns.name}
                for name, vm in VMS.items()},
        "lan": {"router": ROUTER.ip, "lanhost": LANHOST.ip},
    }
