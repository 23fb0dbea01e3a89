"""A fresh Debian root for trying the .deb as a user would: made with debootstrap from the mirror and
release this machine's apt uses, cached pristine under /var/cache/macnat-deb-root/<recipe>/ (rebuilt
only when its recipe changes, as tests/hwsim/run-qemu.sh caches its guest), and used through a
throwaway overlay, so every run starts from the same untouched root.

Commands run in the root through `in-root.sh` (beside this file): chroot with /proc, /sys and /dev
mounted in a mount namespace of their own, so nothing stays mounted when a command ends, not even
after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("MACNAT_DEB_ROOT_CACHE", "/var/cache/macnat-deb-root"))
IN_ROOT = Path(__file__).with_name("in-root.sh")
# Besides minbase: NetworkManager, whose --print-config shows how it reads the package's drop-in.
PACKAGES = ("network-manager",)
# What apt and dpkg keep of their own (caches, lists, logs, backups), not the package's leftovers.
APT_OWN = ("var/cache/apt/", "var/cache/debconf/", "var/lib/apt/", "var/log/")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive"}


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release")


def apt_sources() -> dict[str, str]:
    """The host's apt sources, and the apt settings on how it reaches them (Acquire::...), by path."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    files += [p for p in sorted(Path("/etc/apt/apt.conf.d").glob("*")) if "Acquire::" in p.read_text()]
    return {str(p): p.read_text() for p in files if p.is_file()}


def host_mirror() -> str:
    for text in apt_sources().values():
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return words[-3] if words[1].startswith("[") else words[1]
    raise RuntimeError("no Debian mirror in apt's sources")


def build(root: Path, codename: str, mirror: str, sources: dict[str, str]) -> None:
    log = root.parent / "debootstrap.log"
    with open(log, "w") as out:
        proc = subprocess.run(["debootstrap", "--variant=minbase", codename, str(root), mirror],
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {log.read_text()[-3000:]}")
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for path, text in sources.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    # apt, not debootstrap, installs the rest: it resolves virtual packages (dbus-system-bus). No
    # service starts in the root meanwhile.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    run(root, "apt-get", "update", "-q")
    run(root, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    run(root, "apt-get", "clean")
    policy.unlink()


def pristine() -> Path:
    """The cached root for the current recipe, built first when there is none."""
    codename, mirror, sources = host_codename(), host_mirror(), apt_sources()
    recipe = hashlib.sha256(repr((codename, mirror, sources, PACKAGES, inspect.getsource(build))).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        root = CACHE / recipe / "root"
        if not root.is_dir():
            for old in CACHE.iterdir():
                if old.is_dir() and old.name != "archives":
                    shutil.rmtree(old)
            (CACHE / recipe).mkdir()
            partial = CACHE / recipe / "root.partial"
            build(partial, codename, mirror, sources)
            partial.rename(root)
        return root


@contextlib.contextmanager
def overlay(workdir: Path) -> Iterator[Path]:
    """A writable throwaway root over the pristine one; apt's downloads are kept between runs in
    CACHE/archives (a download cache only: the root itself starts pristine every time)."""
    lower = pristine()
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "root"
    for d in (upper, work, merged, CACHE / "archives/partial"):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(merged)], check=True)
    archives = merged / "var/cache/apt/archives"
    try:
        subprocess.run(["mount", "--bind", str(CACHE / "archives"), str(archives)], check=True)
        try:
            yield merged
        finally:
            subprocess.run(["umount", str(archives)], check=True)
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def run(root: Path, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command in the root, as root there; its output and status."""
    proc = subprocess.run([str(IN_ROOT), str(root), *cmd], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {root} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def file_list(root: Path) -> set[str]:
    """Every path in the root (relative, directories with a trailing /), but apt's own."""
    paths = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        paths.update(prefix + d + "/" for d in dirnames)
        paths.update(prefix + f for f in filenames)
        # Only what lives in the root itself: /proc, /sys and /dev are mounted just while a command runs.
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
    return {p for p in paths if not p.startswith(APT_OWN) and not (p.startswith("var/lib/dpkg/") and p.endswith("-old"))}


class Booted:
    """The root booted with systemd as PID 1 in a container (systemd-nspawn) whose network is the
    namespace `netns`. The root is mounted read-only under a tmpfs (--volatile=overlay): whatever the
    boot and the commands change goes with the container. No udev runs in a container, so device
    units never start anything: units are started by hand."""

    def __init__(self, root: Path, netns: str, *init_args: str, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", f"--directory={root}", "--volatile=overlay", "--boot",
             "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{netns}",
             # bcc and the datapath need what a host's root has: every capability and the bpf syscall.
             "--capability=all", "--system-call-filter=bpf", *init_args],
            stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 120
        while True:
            self.init = next((child for child in _children(self.proc.pid) if _comm(child) == "systemd"), None)
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip() if self.init else ""
            if state in ("running", "degraded"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the container did not boot ({state}): {log.read_text()[-3000:]}")
            time.sleep(0.5)

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["nsenter", "-t", str(self.init), "-a", *cmd], capture_output=True, text=True,
                              env=ENV, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in the container exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _remove_nspawn_cgroups()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def _remove_nspawn_cgroups() -> None:
    """systemd-nspawn --keep-unit splits the cgroup it runs in into payload/ (the container's systemd
    makes its tree below) and supervisor/, and leaves them behind empty: remove them, deepest first
    (rmdir fails on a cgroup that still has processes, which is then left alone)."""
    mounts = {}  # hierarchy as /proc/self/cgroup names it -> where it is mounted
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, options = line.split()[:4]
        if kind == "cgroup2":
            mounts[""] = Path(where)
        elif kind == "cgroup" and "name=systemd" in options.split(","):
            mounts["name=systemd"] = Path(where)
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers not in mounts:
            continue
        for part in ("payload", "supervisor"):
            top = mounts[controllers] / path.lstrip("/") / part
            for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
