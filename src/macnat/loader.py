"""Compiling the datapath with bcc, and attaching it all or nothing.

Attaching creates, in this order: the uplink veth pair (one end a port of the bridge), the config,
the host's addresses, and the three filters (macnat.plumbing has each step); the uplink port comes up
last, so the bridge forwards to it only once its program is in place. Any failure undoes what was
done. Detaching removes exactly what attaching created.

The process that compiles (and so loads LLVM) does not stay: `macnat attach` execs the manager with
the loaded programs' descriptors once they are attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute

from macnat import constants, netlink, plumbing
from macnat.datapath import Datapath
from macnat.errors import MacnatError

DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


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


def kernel_headers() -> Path:
    """The header tree bcc compiles against, /lib/modules/$(uname -r)/build."""
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise MacnatError(f"no kernel headers at {build}: install linux-headers-$(uname -r) "
                          "(proxmox-headers-$(uname -r) on Proxmox VE), or run ./setup.sh")
    return build


def build_id() -> int:
    """What the datapath is built from (its C sources and the constants handed to them), in 16 bits,
    kept in config[0].build: a manager adopts only a datapath with its own build. Taken from the
    files, so it costs no compile."""
    digest = hashlib.sha256(repr(constants.cflags()).encode())
    for path in sorted(bpf_source_dir().glob("*.[ch]")):
        digest.update(path.name.encode() + path.read_bytes())
    return int.from_bytes(digest.digest()[:2], "little")


def compile_datapath():
    """Compile bpf/macnat.c; the bcc BPF object with its maps created and programs not yet loaded
    (Datapath.from_bcc loads them)."""
    bcc = import_bcc()
    source = bpf_source_dir() / "macnat.c"
    build = kernel_headers()
    try:
        return bcc.BPF(src_file=str(source).encode(),
                       cflags=constants.cflags() + [f"-I{source.parent}"])
    except Exception as exc:  # bcc raises bare Exception on compile errors; its details went to stderr
        raise MacnatError(f"bcc could not compile {source}: {exc} (are the kernel headers at {build} complete?)") from None


def check_wifi(ipr: IPRoute, wifi: netlink.Link, bridge: netlink.Link | None = None) -> None:
    """Raise unless `wifi` can carry macnat: a standalone Ethernet-like interface, not the bridge."""
    if wifi.kind == "bridge" or (bridge is not None and wifi.index == bridge.index):
        raise MacnatError(f"'{wifi.name}' is a bridge: give the Wi-Fi interface first, then the bridge")
    if wifi.master:
        master = netlink.link_by_index(ipr, wifi.master)
        raise MacnatError(f"'{wifi.name}' is a port of '{master.name if master else wifi.master}': macnat needs "
                          f"it standalone (ip link set {wifi.name} nomaster)")
    if len(wifi.mac.split(":")) != 6:
        raise MacnatError(f"'{wifi.name}' is not an Ethernet-like interface (no MAC address)")


def check_bridge(bridge: netlink.Link) -> None:
    if bridge.kind != "bridge":
        raise MacnatError(f"'{bridge.name}' is not a bridge (it is {bridge.kind or 'a plain device'})")


def validate(ipr: IPRoute, wifi_name: str, bridge_name: str) -> tuple[netlink.Link, netlink.Link]:
    wifi = netlink.link(ipr, wifi_name)
    bridge = netlink.link(ipr, bridge_name)
    check_bridge(bridge)
    check_wifi(ipr, wifi, bridge)
    return wifi, bridge


def attach(ipr: IPRoute, wifi_name: str, bridge_name: str, datapath: Datapath) -> None:
    """Attach the loaded datapath between wifi and bridge; all or nothing."""
    undo: list[Callable[[], None]] = []
    wifi, bridge = validate(ipr, wifi_name, bridge_name)
    try:
        uplink = plumbing.create_uplink(ipr, wifi.name, bridge)
        undo.append(lambda: plumbing.remove_uplink(ipr, uplink.index))
        config = plumbing.update_config(datapath.maps, wifi_mac=wifi.mac, wifi_ifindex=wifi.index,
                                        bridge_ifindex=bridge.index, uplink_ifindex=uplink.index)
        plumbing.protect_host_addresses(ipr, datapath.maps)
        netlink.fdb_set(ipr, uplink.index, wifi.mac)
        plumbing.attach_uplink(ipr, uplink.index, datapath.programs)
        created = plumbing.attach_wifi(ipr, wifi.index, datapath.programs)
        undo.append(lambda: plumbing.detach_wifi(ipr, wifi.index, created))
        if created:
            plumbing.update_config(datapath.maps, flags=config.flags | constants.CFG_CREATED_CLSACT)
        plumbing.set_up(ipr, uplink)
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()
        raise


def detach(wifi_index: int | None, uplink_index: int | None, created_clsact: bool) -> None:
    """Remove macnat's filters from wifi, the clsact it created (if nothing else uses it), the uplink."""
    with IPRoute() as ipr:
        if wifi_index:
            plumbing.detach_wifi(ipr, wifi_index, created_clsact)
        if uplink_index:
            plumbing.remove_uplink(ipr, uplink_index)
