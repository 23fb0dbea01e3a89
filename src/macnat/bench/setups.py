"""The ways a Wi-Fi laptop's VMs reach the LAN, each switched in and out of the same lab.

All use static VM addresses (DHCP is not what is measured) and the same traffic: vm1 <-> the LAN host.
br_netfilter's iptables calls on bridged traffic are off in the laptop's namespace for all of them,
so each is measured as its own forwarding path.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from macnat import lab
from macnat.bench import traffic

VM_PREFIX = "192.168.77."
NAT_PREFIX = "10.77.0."
VM_HOST_NUMBER = {"vm1": 101, "vm2": 102}


def set_vm_addresses(prefix: str, gateway: str) -> None:
    for vm, host in lab.VMS.items():
        host.ns.ip("-4", "addr", "flush", "dev", host.ifname)
        host.ns.ip("addr", "add", f"{prefix}{VM_HOST_NUMBER[vm]}/24", "dev", host.ifname)
        host.ns.ip("route", "replace", "default", "via", gateway)
        host.ns.ip("neigh", "flush", "dev", host.ifname)


def vm_address(vm: str, prefix: str = VM_PREFIX) -> str:
    return f"{prefix}{VM_HOST_NUMBER[vm]}"


def laptop_sysctl(**values: int) -> None:
    lab.LAPTOP.ns.run("sysctl", "-qw", *(f"{k.replace('__', '.')}={v}" for k, v in values.items()))


class Setup:
    key = ""
    title = ""
    lan_reaches_vms = True
    vm_prefix = VM_PREFIX

    def up(self, workdir: Path) -> None: ...

    def down(self) -> None: ...


class PlainBridge(Setup):
    key, title = "a", "plain bridging, 4-address AP (the limit)"

    def up(self, workdir):
        lab.set_ap(lab.Knobs(ap_filter=False))
        lab.LAPTOP.ns.ip("link", "set", lab.LAPTOP.ifname, "master", lab.BRIDGE)
        set_vm_addresses(VM_PREFIX, lab.GATEWAY)

    def down(self):
        lab.LAPTOP.ns.ip("link", "set", lab.LAPTOP.ifname, "nomaster")
        lab.set_ap(lab.Knobs())


class Macnat(Setup):
    key, title = "b", "macnat"

    def up(self, workdir):
        set_vm_addresses(VM_PREFIX, lab.GATEWAY)
        self.manager = lab.RunningManager(log=workdir / "macnat.log")

    def down(self):
        self.manager.stop()


class EbtablesNat(Setup):
    """The classic recipe: wlan0 bridged, source MAC NAT with --snat-arp, one DNAT per VM address."""

    key, title = "c", "ebtables-nft MAC NAT"

    def up(self, workdir):
        ns, wifi = lab.LAPTOP.ns, lab.LAPTOP.ifname
        ns.ip("link", "set", wifi, "master", lab.BRIDGE)
        set_vm_addresses(VM_PREFIX, lab.GATEWAY)
        ns.run("ebtables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", wifi, "-j", "snat",
               "--to-src", lab.LAPTOP.mac, "--snat-arp", "--snat-target", "ACCEPT")
        for vm, host in lab.VMS.items():
            for match in (["-p", "IPv4", "--ip-dst"], ["-p", "ARP", "--arp-ip-dst"]):
                ns.run("ebtables-nft", "-t", "nat", "-A", "PREROUTING", "-i", wifi, *match, vm_address(vm),
                       "-j", "dnat", "--to-dst", host.mac, "--dnat-target", "ACCEPT")

    def down(self):
        lab.LAPTOP.ns.run("ebtables-nft", "-t", "nat", "-F")
        lab.LAPTOP.ns.run("nft", "delete", "table", "bridge", "nat")
        lab.LAPTOP.ns.ip("link", "set", lab.LAPTOP.ifname, "nomaster")


class ProxyArpRouting(Setup):
    """Debian's parprouted (proxy ARP, /32 host routes) and dhcp-helper (DHCP relay), as the
    Debian/Proxmox wiki recipe has it: vmbr0 borrows wlan0's address, the laptop routes."""

    key, title = "d", "parprouted + dhcp-helper"

    def up(self, workdir):
        ns = lab.LAPTOP.ns
        laptop_sysctl(net__ipv4__ip_forward=1)
        ns.ip("addr", "add", f"{lab.LAPTOP.ip}/32", "dev", lab.BRIDGE)
        set_vm_addresses(VM_PREFIX, lab.GATEWAY)
        self.daemons = [
            ns.spawn("parprouted", "-d", lab.LAPTOP.ifname, lab.BRIDGE, log=workdir / "parprouted.log"),
            ns.spawn("dhcp-helper", "-n", "-s", lab.GATEWAY, "-i", lab.BRIDGE, "-r", str(workdir / "dhcp-helper.pid"),
                     log=workdir / "dhcp-helper.log"),
        ]

    def down(self):
        for daemon in self.daemons:
            daemon.terminate()
            daemon.wait(5)
        ns = lab.LAPTOP.ns
        ns.ip("addr", "del", f"{lab.LAPTOP.ip}/32", "dev", lab.BRIDGE)
        ns.run("ip", "route", "flush", "dev", lab.BRIDGE, check=False)
        laptop_sysctl(net__ipv4__ip_forward=0)
        for dev in (lab.LAPTOP.ifname, lab.BRIDGE):
            laptop_sysctl(**{f"net__ipv4__conf__{dev}__proxy_arp": 0})
        ns.ip("neigh", "flush", "dev", lab.LAPTOP.ifname)


class Masquerade(Setup):
    """NAT with iptables-nft, as Proxmox's documentation suggests for Wi-Fi: the VMs are hidden."""

    key, title = "e", "masquerade NAT (iptables-nft)"
    lan_reaches_vms = False
    vm_prefix = NAT_PREFIX

    def up(self, workdir):
        ns = lab.LAPTOP.ns
        laptop_sysctl(net__ipv4__ip_forward=1)
        ns.ip("addr", "add", f"{NAT_PREFIX}1/24", "dev", lab.BRIDGE)
        set_vm_addresses(NAT_PREFIX, f"{NAT_PREFIX}1")
        ns.run("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", f"{NAT_PREFIX}0/24", "-o", lab.LAPTOP.ifname,
               "-j", "MASQUERADE")

    def down(self):
        ns = lab.LAPTOP.ns
        ns.run("iptables-nft", "-t", "nat", "-F")
        ns.run("nft", "delete", "table", "ip", "nat")
        ns.ip("addr", "del", f"{NAT_PREFIX}1/24", "dev", lab.BRIDGE)
        laptop_sysctl(net__ipv4__ip_forward=0)


SETUPS: list[Setup] = [PlainBridge(), Macnat(), EbtablesNat(), ProxyArpRouting(), Masquerade()]


def forget_neighbours() -> None:
    """Every setup starts from empty neighbour caches: what one setup taught the LAN (a VM behind
    the laptop's MAC, say) would otherwise mislead the next one until it timed out."""
    for host in (lab.ROUTER, lab.LANHOST, *lab.VMS.values()):
        host.ns.ip("neigh", "flush", "dev", host.ifname)
    lab.LAPTOP.ns.ip("neigh", "flush", "all")


@contextmanager
def active(setup: Setup, workdir: Path):
    """The setup in place, from clean neighbour caches, once vm1 reaches the LAN host; removed after."""
    forget_neighbours()
    setup.up(workdir)
    try:
        traffic.wait_reachable(lab.VMS["vm1"].ns, lab.LANHOST.ip)
        yield setup
    finally:
        setup.down()


def prepare_lab() -> None:
    lab.up()
    laptop_sysctl(**{"net__bridge__bridge-nf-call-iptables": 0, "net__bridge__bridge-nf-call-ip6tables": 0,
                     "net__bridge__bridge-nf-call-arptables": 0})
