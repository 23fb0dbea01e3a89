"""Network namespaces and the commands run inside them (used by the lab, the tests and the benchmarks).

Every command goes through `ip netns exec`, exactly as a person would type it, so what the lab and the
tests exercise is what a user sees.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from macnat.errors import MacnatError

# Every namespace macnat's lab, tests and benchmarks create starts with this; MACNAT_NS_PREFIX lets
# two of them run side by side on one machine (each with its own lab).
PREFIX = os.environ.get("MACNAT_NS_PREFIX", "mn")

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run(*cmd: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command in the current namespace, capturing its output; a failure raises MacnatError."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise MacnatError(f"'{' '.join(cmd)}' did not finish within {timeout:g} s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise MacnatError(f"'{' '.join(cmd)}' failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc


def names() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    out = run("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class Namespace:
    """A named network namespace (`ip netns add`)."""

    name: str

    @classmethod
    def create(cls, name: str) -> Namespace:
        ns = cls(name)
        ns.delete()
        run("ip", "netns", "add", name)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def exists(self) -> bool:
        return Path("/run/netns", self.name).exists()

    def exec_argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        return run(*self.exec_argv(*cmd), check=check, timeout=timeout, input=input)

    def spawn(self, *cmd: str, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running process in the namespace, its output going to `log`."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(self.exec_argv(*cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            if log:
                out.close()

    def pids(self) -> list[int]:
        if not self.exists():
            return []
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, grace: float = 2.0) -> None:
        """End every process in the namespace: SIGTERM, then SIGKILL for whatever is left after `grace`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = self.pids()
            if not pids:
                return

    def delete(self) -> None:
        """Kill the namespace's processes and remove it; a namespace that is not there is fine."""
        if self.exists():
            self.kill_all()
            run("ip", "netns", "del", self.name)

    @contextmanager
    def entered(self):
        """Move the calling thread into this namespace for the duration of the block.

        BPF_PROG_TEST_RUN resolves (and really transmits on) ifindexes in the caller's namespace.
        """
        with open("/proc/self/ns/net") as original, open(f"/run/netns/{self.name}") as target:
            _setns(target.fileno())
            try:
                yield self
            finally:
                _setns(original.fileno())

    def ip(self, *args: str) -> str:
        return self.run("ip", *args).stdout
