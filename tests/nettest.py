"""Test helpers over the lab: captures, pings, traffic. Reusable by every test module."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from scapy.all import rdpcap

from macnat.netns import Namespace


@contextmanager
def capture(ns: Namespace, ifname: str, bpf_filter: str = "", tmp: Path = Path("/tmp")):
    """Capture on one interface while the body runs; yields a list filled with scapy packets at exit."""
    pcap = tmp / f"cap-{ns.name}-{ifname}-{time.monotonic_ns()}.pcap"
    proc = ns.spawn("tcpdump", "-i", ifname, "-U", "-n", "-w", str(pcap), *bpf_filter.split())
    packets: list = []
    deadline = time.monotonic() + 5
    while not pcap.exists() or pcap.stat().st_size == 0:  # tcpdump writes the pcap header once listening
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tcpdump did not start on {ns.name}/{ifname}")
        time.sleep(0.02)
    try:
        yield packets
    finally:
        time.sleep(0.2)
        proc.terminate()
        proc.wait(5)
        packets.extend(rdpcap(str(pcap)))
        pcap.unlink()


def ping(ns: Namespace, target: str, count: int = 1, timeout: float = 2) -> bool:
    """True when every one of `count` echo requests was answered."""
    proc = ns.run("ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(timeout), target,
                  check=False, timeout=count * 0.2 + timeout + 5)
    return proc.returncode == 0


def neighbours(ns: Namespace) -> dict[str, str]:
    """IP -> MAC of the namespace's neighbour table (reachable or stale entries only)."""
    out = json.loads(ns.ip("-j", "neigh", "show"))
    return {n["dst"]: n["lladdr"] for n in out if "lladdr" in n}


def tcp_transfer(server: Namespace, server_ip: str, client: Namespace, seconds: float = 1,
                 reverse: bool = False) -> float:
    """iperf3 TCP from client to server (or back with reverse); returns bits/s received."""
    srv = server.spawn("iperf3", "-s", "-1", "-B", server_ip)
    try:
        for _ in range(50):
            if server.run("ss", "-ltn", f"sport = :5201", check=False).stdout.count("LISTEN"):
                break
            time.sleep(0.05)
        argv = ["iperf3", "-c", server_ip, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
        out = client.run(*argv, timeout=seconds + 20)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.kill()
        srv.wait()


MACNAT = str(Path(sys.executable).parent / "macnat")


def macnat(*args: str, ns: Namespace | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The macnat CLI as a user runs it (by default in the lab's laptop namespace)."""
    from macnat import lab

    argv = (ns or lab.LAPTOP.ns).exec_argv(MACNAT, *args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


class RunningManager:
    """`macnat attach wlan0 vmbr0 ...` in the foreground of a background process, as a user runs it."""

    def __init__(self, *args: str, log: Path):
        from macnat import lab

        self.log = log
        self.proc = lab.LAPTOP.ns.spawn(MACNAT, "attach", "wlan0", "vmbr0", *args, log=log)
        deadline = time.monotonic() + 30
        while True:
            status = macnat("status", "--json", check=False)
            if status.returncode == 0 and any(a["manager_pid"] == self.proc.pid for a in json.loads(status.stdout)):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"macnat attach did not come up: {self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)
