"""Compiling the datapath with bcc and attaching it with pyroute2 (cls_bpf, direct action); detaching.

Attaching creates, in this order: the uplink veth pair (one end a port of the bridge), clsact where
missing, the config, and the three filters, each with macnat's own priority and handle; the uplink
port comes up last, so the bridge forwards to it only once its program is in place. Any failure
undoes what was done. Detaching removes exactly what attaching created.

The process that compiles (and so loads LLVM) does not stay: `macnat attach` execs the manager once
the programs are attached.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from macnat import bpfsys, constants, netlink
from macnat.errors import MacnatError
from macnat.maps import Config, Map, ip_key, mac_bytes, u8, u32

TC_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
TC_PARENT_ID = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
FILTER_NAME_PREFIX = "macnat:"


def import_bcc():
    """Debian's bcc bindings, also from a venv that does not see dist-packages."""
    try:
        bcc = importlib.import_module("bcc")
    except ImportError:
        if not Path(DEBIAN_DIST_PACKAGES, "bcc").is_dir():
            raise MacnatError("bcc is missing: install Debian's python3-bpfcc (apt install python3-bpfcc); "
                              "PyPI's 'bcc' is an unrelated package") from None
        sys.path.append(DEBIAN_DIST_PACKAGES)
        try:
            bcc = importlib.import_module("bcc")
        finally:
            sys.path.remove(DEBIAN_DIST_PACKAGES)
    if not hasattr(bcc, "BPF"):
        raise MacnatError(f"the 'bcc' module at {bcc.__file__} is not BCC (PyPI's 'bcc' is an unrelated "
                          "package): pip uninstall bcc, then apt install python3-bpfcc")
    return bcc


def bpf_source_dir() -> Path:
    """The datapath sources: package data in an installed macnat, the repo's bpf/ in a checkout."""
    packaged = Path(__file__).with_name("bpf")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "bpf"


def compile_datapath():
    """Compile bpf/macnat.c; the bcc BPF object with its maps created and programs not yet loaded."""
    bcc = import_bcc()
    source = bpf_source_dir() / "macnat.c"
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise MacnatError(f"no kernel headers at {build}: install linux-headers-$(uname -r) "
                          "(proxmox-headers-$(uname -r) on Proxmox VE), or run ./setup.sh")
    try:
        return bcc.BPF(src_file=str(source).encode(),
                       cflags=constants.cflags() + [f"-I{source.parent}"])
    except Exception as exc:  # bcc raises bare Exception on compile errors; its details went to stderr
        raise MacnatError(f"bcc could not compile {source}: {exc} (are the kernel headers at {build} complete?)") from None


def uplink_names(wifi: netlink.Link) -> tuple[str, str]:
    """(bridge port, its peer): readable where the Wi-Fi name allows, always within 15 characters."""
    base = f"mn-{wifi.name}" if len(wifi.name) <= 10 else f"mn-if{wifi.index}"
    return base, f"{base}-p"


def validate(ipr: IPRoute, wifi_name: str, bridge_name: str) -> tuple[netlink.Link, netlink.Link]:
    wifi = netlink.link(ipr, wifi_name)
    bridge = netlink.link(ipr, bridge_name)
    if bridge.kind != "bridge":
        raise MacnatError(f"'{bridge_name}' is not a bridge (it is {bridge.kind or 'a plain device'})")
    if wifi.kind == "bridge" or wifi.index == bridge.index:
        raise MacnatError(f"'{wifi_name}' is a bridge: give the Wi-Fi interface first, then the bridge")
    if wifi.master:
        master = netlink.link_by_index(ipr, wifi.master)
        raise MacnatError(f"'{wifi_name}' is a port of '{master.name if master else wifi.master}': macnat needs "
                          f"it standalone (ip link set {wifi_name} nomaster)")
    if len(wifi.mac.split(":")) != 6:
        raise MacnatError(f"'{wifi_name}' is not an Ethernet-like interface (no MAC address)")
    return wifi, bridge


def _disable_ipv6(ifname: str) -> None:
    # The uplink pair must stay silent: router solicitations or MLD from it would reach the VMs.
    path = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    if path.exists():
        path.write_text("1")


def add_filter(ipr: IPRoute, index: int, hook: str, fd: int, program: str) -> None:
    ipr.tc("add-filter", "bpf", index, constants.TC_HANDLE, fd=fd, name=FILTER_NAME_PREFIX + program,
           parent=TC_PARENT[hook], classid=1, direct_action=True, prio=constants.TC_PRIO)


def del_filter(ipr: IPRoute, index: int, hook: str) -> None:
    try:
        ipr.tc("del-filter", "bpf", index, constants.TC_HANDLE, parent=TC_PARENT[hook], prio=constants.TC_PRIO)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


def foreign_filters(ipr: IPRoute, index: int) -> bool:
    """Whether filters other than macnat's sit on the device's clsact."""
    for parent in TC_PARENT_ID.values():
        for msg in ipr.get_filters(index=index, parent=parent):
            if msg["info"] >> 16 != constants.TC_PRIO:
                return True
    return False


def attach(ipr: IPRoute, wifi_name: str, bridge_name: str, bpf) -> None:
    """Attach the compiled datapath `bpf` between wifi and bridge; all or nothing."""
    undo: list[Callable[[], None]] = []
    wifi, bridge = validate(ipr, wifi_name, bridge_name)
    fds = {name: bpf.load_func(name.encode(), bpf.SCHED_CLS).fd for name in constants.PROGRAMS}
    try:
        port_name, peer_name = uplink_names(wifi)
        try:
            ipr.link("add", ifname=port_name, kind="veth", peer=peer_name)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise MacnatError(f"'{port_name}' already exists: a macnat uplink left behind? "
                                  f"macnat detach {wifi_name}, or ip link del {port_name}") from None
            raise
        uplink = netlink.link(ipr, port_name)
        undo.append(lambda: ipr.link("del", index=uplink.index))
        peer = netlink.link(ipr, peer_name)
        for name in (port_name, peer_name):
            _disable_ipv6(name)
        ipr.link("set", index=uplink.index, ifalias=f"macnat uplink of {wifi.name} into {bridge.name}",
                 mtu=bridge.mtu, master=bridge.index)
        ipr.link("set", index=peer.index, mtu=bridge.mtu, state="up")

        created_clsact = 0
        try:
            ipr.tc("add", "clsact", wifi.index)
            created_clsact = constants.CFG_CREATED_CLSACT
            undo.append(lambda: ipr.tc("del", "clsact", wifi.index))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.tc("add", "clsact", uplink.index)

        config_fd = bpf[b"config"].map_fd
        config = Map("config", config_fd, bpfsys.map_info(config_fd))
        config.update(u32(0), Config(wifi_mac=mac_bytes(wifi.mac), wifi_ifindex=wifi.index,
                                     bridge_ifindex=bridge.index, uplink_ifindex=uplink.index,
                                     flags=created_clsact))
        host_fd = bpf[b"host_addrs"].map_fd
        host = Map("host_addrs", host_fd, bpfsys.map_info(host_fd))
        for ip in netlink.host_addresses(ipr):
            host.update(ip_key(ip), u8(1))
        netlink.fdb_set(ipr, uplink.index, wifi.mac)

        add_filter(ipr, uplink.index, "egress", fds["uplink_egress"], "uplink_egress")
        for program in ("wifi_egress", "wifi_ingress"):
            hook = constants.PROGRAMS[program][1]
            add_filter(ipr, wifi.index, hook, fds[program], program)
            undo.append(lambda hook=hook: del_filter(ipr, wifi.index, hook))
        ipr.link("set", index=uplink.index, state="up")
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()
        raise
    finally:
        bpf.cleanup()  # our fds go; the filters hold the programs, and the programs the maps


def detach(wifi_index: int, uplink_index: int | None, created_clsact: bool) -> None:
    """Remove macnat's filters from wifi, the clsact it created (if nothing else uses it), the uplink."""
    with IPRoute() as ipr:
        for hook in TC_PARENT:
            del_filter(ipr, wifi_index, hook)
        if created_clsact and not foreign_filters(ipr, wifi_index):
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", wifi_index)
        if uplink_index:
            try:
                ipr.link("del", index=uplink_index)  # its peer, filters and FDB entries go with it
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
