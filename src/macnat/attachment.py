"""Finding a running attachment from what the kernel holds, and the lock and status of its manager.

An attachment is found from the filters on the Wi-Fi interface: `tc -j filter show` reports the ID of
the program behind each (pyroute2 0.9 does not decode TCA_BPF_ID), the program's info lists its maps'
IDs, and the config map names the bridge and the uplink. Nothing is pinned, so nothing goes stale,
and every command finds the same objects from any mount namespace, including through
`ip netns exec`, which remounts /sys and with it /sys/fs/bpf.

While the Wi-Fi interface is gone (a dongle unplugged), its manager still holds the programs and their
tables; its status file in /run/macnat names them, so `status`, `table` and `stats` still find them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from macnat import constants, loader, netlink, plumbing
from macnat.errors import MacnatError
from macnat.maps import Config, Maps, mac_str

RUN_DIR = Path("/run/macnat")


def tc_programs(ifname: str, hook: str) -> dict[str, int]:
    """macnat's programs on one hook of a device: program name -> program ID."""
    proc = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, hook], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {}
    found = {}
    for entry in json.loads(proc.stdout):
        options = entry.get("options", {})
        name = options.get("bpf_name", "")
        if entry.get("pref") == constants.TC_PRIO and name.startswith(plumbing.FILTER_NAME_PREFIX) and "prog" in options:
            found[name.removeprefix(plumbing.FILTER_NAME_PREFIX)] = options["prog"]["id"]
    return found


def device_programs(link: netlink.Link) -> dict[str, int]:
    return {**tc_programs(link.name, "ingress"), **tc_programs(link.name, "egress")}


@dataclass
class Attachment:
    wifi_name: str
    wifi: netlink.Link | None         # None while the manager waits for the Wi-Fi interface
    bridge: netlink.Link | None
    uplink: netlink.Link | None
    programs: dict[str, int]          # program name -> ID, of those attached to a device
    maps: Maps
    config: Config = field(repr=False)
    manager: dict | None = None       # the running manager's status file

    @property
    def complete(self) -> bool:
        return (self.wifi is not None and set(self.programs) == set(constants.PROGRAMS)
                and self.bridge is not None and self.uplink is not None)

    @property
    def state(self) -> str:
        if self.manager and self.manager.get("state"):
            return self.manager["state"]
        return "attached" if self.complete else "incomplete"

    def close(self) -> None:
        self.maps.close()

    def detach(self) -> None:
        """Remove it from the kernel (what remains of it: each step tolerates what is already gone)."""
        created_clsact = bool(self.maps.current_config().flags & constants.CFG_CREATED_CLSACT)
        with IPRoute() as ipr:  # the VMs' FDB entries the manager pinned on their ports (the uplink's go with it)
            for key, vm in self.maps.vm_macs.items():
                if vm.port:
                    netlink.fdb_del(ipr, vm.port, mac_str(key.addr))
        loader.detach(self.wifi.index if self.wifi else None, self.uplink.index if self.uplink else None,
                      created_clsact)

    def describe(self) -> dict:
        return {
            "wifi": self.wifi_name, "wifi_mac": mac_str(self.config.wifi_mac),
            "bridge": self.bridge.name if self.bridge else None,
            "uplink": self.uplink.name if self.uplink else None,
            "programs": self.programs, "complete": self.complete, "state": self.state,
            "manager_pid": (self.manager or {}).get("pid"),
            "network": (self.manager or {}).get("network"),
            # the manager's view ("auto: rewrite since ..."); the datapath's flag when none runs
            "dhcp": (self.manager or {}).get("dhcp")
            or ("rewrite" if self.config.flags & constants.CFG_DHCP_REWRITE else "keep"),
        }


def find(ipr: IPRoute, wifi_name: str) -> Attachment | None:
    wifi = netlink.find_link(ipr, wifi_name)
    manager = ManagerLock(wifi_name).status()
    programs = device_programs(wifi) if wifi else {}
    if programs.keys() & set(plumbing.WIFI_HOOKS.values()):
        maps = Maps.from_prog_ids(list(programs.values()))
    elif manager:  # the Wi-Fi interface is gone or not attached yet: the manager holds the programs
        wifi = None
        maps = Maps.from_prog_ids(list(manager["program_ids"].values()))
    else:
        return None
    config = maps.current_config()
    uplink = netlink.link_by_index(ipr, config.uplink_ifindex) if config.uplink_ifindex else None
    if uplink:
        programs.update(device_programs(uplink))
    bridge = netlink.link_by_index(ipr, config.bridge_ifindex) if config.bridge_ifindex else None
    return Attachment(wifi_name, wifi, bridge, uplink, programs, maps, config, manager)


def remove_other_build(ipr: IPRoute, wifi_name: str) -> None:
    """Take off what another macnat version attached to the Wi-Fi interface, by netlink alone: its tables
    are laid out otherwise and cannot be read (a clsact it created stays: nothing says it did)."""
    wifi = netlink.find_link(ipr, wifi_name)
    uplink = netlink.find_link(ipr, plumbing.uplink_names(wifi_name)[0])
    loader.detach(wifi.index if wifi else None, uplink.index if uplink else None, created_clsact=False)


def find_all(ipr: IPRoute) -> list[Attachment]:
    """Every attachment in this network namespace, and every manager waiting for its Wi-Fi interface."""
    names = {lk.name for lk in netlink.links(ipr) if "ingress" in plumbing.macnat_hooks(ipr, lk.index)}
    names |= set(ManagerLock.running_in_this_namespace())
    return [a for a in (find(ipr, name) for name in sorted(names)) if a]


def require(ipr: IPRoute, wifi_name: str) -> Attachment:
    attachment = find(ipr, wifi_name)
    if attachment is None:
        raise MacnatError(f"macnat is not attached to '{wifi_name}' (macnat status lists attachments)")
    return attachment


def _netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class ManagerLock:
    """The lock a running manager holds for one Wi-Fi interface of one network namespace, and the status
    file it keeps beside it.

    Kept in /run, which `ip netns exec` leaves shared, keyed by the namespace's inode so managers in
    different namespaces never collide. The kernel drops the lock when the manager dies.
    """

    def __init__(self, wifi_name: str, fd: int | None = None):
        self.wifi_name = wifi_name
        self.path = RUN_DIR / f"{_netns()}-{wifi_name}.lock"
        self.status_path = self.path.with_suffix(".json")
        self.fd = fd  # given: the lock is already held, handed over across exec

    @staticmethod
    def running_in_this_namespace() -> list[str]:
        """Wi-Fi interface names whose manager is running in this network namespace."""
        prefix = f"{_netns()}-"
        names = [p.name.removeprefix(prefix).removesuffix(".lock") for p in RUN_DIR.glob(f"{prefix}*.lock")]
        return [name for name in names if ManagerLock(name).holder()]

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
            self.status_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            self._remove_empty_dir()

    def discard_if_stale(self) -> None:
        """Remove the files a killed manager left behind (nobody holds the lock any more)."""
        if self.path.exists() and self.holder() is None:
            self.status_path.unlink(missing_ok=True)
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

    def write_status(self, status: dict) -> None:
        """Replace the status file atomically (readers never see half of it)."""
        with tempfile.NamedTemporaryFile("w", dir=RUN_DIR, prefix=".status-", delete=False) as tmp:
            json.dump(status, tmp)
        os.replace(tmp.name, self.status_path)

    def status(self) -> dict | None:
        """The running manager's status, or None when no manager runs for this interface."""
        pid = self.holder()
        if not pid:
            return None
        try:
            status = json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return {**status, "pid": pid}
