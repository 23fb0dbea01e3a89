"""Test helpers over the lab: captures, traffic and raw frames. Reusable by every test module."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from scapy.all import rdpcap

from macnat.netns import Namespace


@contextmanager
def capture(ns: Namespace, ifname: str, bpf_filter: str = "", tmp: Path = Path("/tmp")):
    """Capture on one interface while the body runs; yields a list filled with scapy packets at exit.
    tcpdump runs in immediate mode: otherwise libpcap hands over a frame only when its ring block is
    full or its 1 s timeout passes, and a capture stopped sooner loses the last frames."""
    pcap = tmp / f"cap-{ns.name}-{ifname}-{time.monotonic_ns()}.pcap"
    proc = ns.spawn("tcpdump", "-i", ifname, "--immediate-mode", "-U", "-n", "-w", str(pcap), *bpf_filter.split())
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


def tcp_transfer(server: Namespace, server_ip: str, client: Namespace, seconds: float = 1,
                 reverse: bool = False) -> float:
    """iperf3 TCP from client to server (or back with reverse); returns bits/s received."""
    srv = server.spawn("iperf3", "-s", "-1", "-B", server_ip)
    try:
        for _ in range(50):
            if server.run("ss", "-ltn", "sport = :5201", check=False).stdout.count("LISTEN"):
                break
            time.sleep(0.05)
        argv = ["iperf3", "-c", server_ip, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
        out = client.run(*argv, timeout=seconds + 20)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.kill()
        srv.wait()



def send_frames(ns: Namespace, ifname: str, frames: Iterable[bytes]) -> int:
    """Send raw frames out of an interface of a namespace (AF_PACKET), as a program there would; the
    number sent. The socket is made inside the namespace (it stays bound to it), the rest happens here."""
    with ns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sent = 0
    try:
        sock.bind((ifname, 0))
        for frame in frames:
            sock.send(frame)
            sent += 1
    finally:
        sock.close()
    return sent
