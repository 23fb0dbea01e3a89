"""Bounded traffic between two lab namespaces: iperf3 TCP and 64-byte UDP, and ping round trips.

The VM is always the iperf3 client (so NAT setups can be measured too); `reverse` makes the LAN host
send (iperf3 -R): the LAN -> VM direction.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from contextlib import contextmanager

from macnat.errors import MacnatError
from macnat.netns import Namespace

IPERF_PORT = 5201


@contextmanager
def iperf_server(ns: Namespace, bind: str):
    server = ns.spawn("iperf3", "-s", "-1", "-B", bind, "-p", str(IPERF_PORT))
    try:
        deadline = time.monotonic() + 5
        while f":{IPERF_PORT} " not in ns.run("ss", "-Hltnu", check=False).stdout:
            if time.monotonic() > deadline:
                raise MacnatError(f"iperf3 did not start in {ns.name}")
            time.sleep(0.02)
        yield
    finally:
        server.kill()
        server.wait()


def _iperf(client: Namespace, server: Namespace, server_ip: str, seconds: int, extra: list[str]) -> dict:
    with iperf_server(server, server_ip):
        out = client.run("iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                         "--connect-timeout", "3000", *extra, check=False, timeout=seconds + 30)
    result = json.loads(out.stdout) if out.stdout.strip() else {"error": out.stderr.strip()}
    if "error" in result:
        raise MacnatError(f"iperf3 {' '.join(extra)} to {server_ip}: {result['error']}")
    return result["end"]


def tcp_gbits(client: Namespace, server: Namespace, server_ip: str, seconds: int, reverse: bool) -> float:
    end = _iperf(client, server, server_ip, seconds, ["-R"] if reverse else [])
    return end["sum_received"]["bits_per_second"] / 1e9


def udp64(client: Namespace, server: Namespace, server_ip: str, seconds: int, reverse: bool) -> tuple[float, float]:
    """(packets per second delivered, loss in percent) for 64-byte UDP payloads sent as fast as possible."""
    end = _iperf(client, server, server_ip, seconds, ["-u", "-l", "64", "-b", "0"] + (["-R"] if reverse else []))
    s = end["sum"]
    delivered = s["packets"] - s["lost_packets"]
    return delivered / s["seconds"], s["lost_percent"]


def rtt_ms(ns: Namespace, target: str, count: int) -> tuple[float, float]:
    """(p50, p99) of `count` echo round trips, 2 ms apart."""
    out = ns.run("ping", "-n", "-c", str(count), "-i", "0.002", "-W", "1", target, check=False,
                 timeout=count * 0.01 + 10).stdout
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    if len(times) < count // 2:
        raise MacnatError(f"ping {target}: only {len(times)} of {count} answered")
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def wait_reachable(ns: Namespace, target: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while ns.run("ping", "-n", "-c1", "-W1", target, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise MacnatError(f"{target} is not reachable from {ns.name}")
