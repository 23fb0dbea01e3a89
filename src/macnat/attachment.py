"""Finding a running attachment from what the kernel holds, and the lock of its manager.

An attachment is found from the filters on the Wi-Fi interface: `tc -j filter show` reports the ID of
the program behind each (pyroute2 0.9 does not decode TCA_BPF_ID), the program's info lists its maps'
IDs, and the config map names the bridge and the uplink. Nothing is pinned, so nothing goes stale,
and every command finds the same objects from any mount namespace, including through
`ip netns exec`, which remounts /sys and with it /sys/fs/bpf.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from macnat import constants, netlink
from macnat.errors import MacnatError
from macnat import loader
from macnat.loader import FILTER_NAME_PREFIX, uplink_names
from macnat.maps import Config, Maps, mac_str

RUN_DIR = Path("/run/macnat")
WIFI_PROGRAMS = {name for name, (role, _) in constants.PROGRAMS.items() if role == "wifi"}


def tc_programs(ifname: str, hook: str) -> dict[str, int]:
    """macnat's programs on one hook of a device: program name -> program ID."""
    proc = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, hook], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {}
    found = {}
    for entry in json.loads(proc.stdout):
        options = entry.get("options", {})
        name = options.get("bpf_name", "")
        if entry.get("pref") == constants.TC_PRIO and name.startswith(FILTER_NAME_PREFIX) and "prog" in options:
            found[name.removeprefix(FILTER_NAME_PREFIX)] = options["prog"]["id"]
    return found


@dataclass
class Attachment:
    wifi: netlink.Link
    bridge: netlink.Link | None
    uplink: netlink.Link | None
    programs: dict[str, int]          # program name -> ID
    maps: Maps
    config: Config = field(repr=False)

    @property
    def complete(self) -> bool:
        return set(self.programs) == set(constants.PROGRAMS) and self.bridge is not None and self.uplink is not None

    def close(self) -> None:
        self.maps.close()

    def detach(self) -> None:
        """Remove it from the kernel (what remains of it: each step tolerates what is already gone)."""
        created_clsact = bool(self.maps.current_config().flags & constants.CFG_CREATED_CLSACT)
        with IPRoute() as ipr:  # the VMs' FDB entries the manager pinned on their ports (the uplink's go with it)
            for key, vm in self.maps.vm_macs.items():
                if vm.port:
                    netlink.fdb_del(ipr, vm.port, mac_str(key.addr))
        loader.detach(self.wifi.index, self.uplink.index if self.uplink else None, created_clsact)

    def describe(self) -> dict:
        lock = ManagerLock(self.wifi)
        return {
            "wifi": self.wifi.name, "wifi_mac": mac_str(self.config.wifi_mac),
            "bridge": self.bridge.name if self.bridge else None,
            "uplink": self.uplink.name if self.uplink else None,
            "programs": self.programs, "complete": self.complete,
            "manager_pid": lock.holder(),
        }


def find(ipr: IPRoute, wifi_name: str) -> Attachment | None:
    return _find(ipr, netlink.link(ipr, wifi_name))


def _find(ipr: IPRoute, wifi: netlink.Link) -> Attachment | None:
    programs = {**tc_programs(wifi.name, "ingress"), **tc_programs(wifi.name, "egress")}
    if not programs.keys() & WIFI_PROGRAMS:
        return None
    uplink_name, _ = uplink_names(wifi)
    programs.update(tc_programs(uplink_name, "egress"))
    maps = Maps.from_prog_ids(list(programs.values()))
    config = maps.current_config()
    bridge = netlink.link_by_index(ipr, config.bridge_ifindex)
    uplink = netlink.link_by_index(ipr, config.uplink_ifindex)
    return Attachment(wifi, bridge, uplink, programs, maps, config)


def find_all(ipr: IPRoute) -> list[Attachment]:
    """Every attachment in this network namespace."""
    return [a for a in (_find(ipr, lk) for lk in netlink.links(ipr)) if a]


def require(ipr: IPRoute, wifi_name: str) -> Attachment:
    attachment = find(ipr, wifi_name)
    if attachment is None:
        raise MacnatError(f"macnat is not attached to '{wifi_name}' (macnat status lists attachments)")
    return attachment


class ManagerLock:
    """The lock a running manager holds for one Wi-Fi interface of one network namespace.

    Kept in /run, which `ip netns exec` leaves shared, keyed by the namespace's inode so managers in
    different namespaces never collide. The kernel drops the lock when the manager dies.
    """

    def __init__(self, wifi: netlink.Link, fd: int | None = None):
        netns = os.stat("/proc/self/ns/net").st_ino
        self.path = RUN_DIR / f"{netns}-{wifi.name}.lock"
        self.fd = fd  # given: the lock is already held, handed over across exec

    def acquire(self) -> bool:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            self._remove_empty_dir()

    def discard_if_stale(self) -> None:
        """Remove the lock file a killed manager left behind (nobody holds it any more)."""
        if self.path.exists() and self.holder() is None:
            self.path.unlink(missing_ok=True)
            self._remove_empty_dir()

    @staticmethod
    def _remove_empty_dir() -> None:
        with contextlib.suppress(OSError):  # another namespace's manager still has its lock there
            RUN_DIR.rmdir()

    def holder(self) -> int | None:
        """PID of the running manager, or None when no manager holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            content = os.read(fd, 32).decode().strip()
            return int(content) if content.isdigit() else -1
        finally:
            os.close(fd)
