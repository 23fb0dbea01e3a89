"""How long the VMs are cut off when the laptop's Wi-Fi changes: event -> VM reachable again.

One `macnat attach` for the whole measurement, the VMs on dhcpcd (which asks again for a lease when
its carrier comes back), in a lab with a second network:
- flap: wlan0 down for 1 s and up; from the moment it is up (and the host's route is back) until the
  LAN host's next echo reply from vm1 (a continuous ping every 20 ms);
- re-plug: wlan0 deleted and created again (a new ifindex); from the moment it exists, associated and
  configured, until the LAN host's next echo reply from vm1;
- roam: to the other network with another MAC; from the moment the laptop is associated and has its
  address there until vm1 has a lease in the new subnet, and until the new LAN's host reaches it.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

from macnat import lab

PING_INTERVAL = 0.02
MACS = ("02:4d:4e:00:00:0b", "02:4d:4e:00:00:0c")


def _first_reply_after(ns, ip: str, event, log: Path, timeout: float = 20) -> float | None:
    """Run `event` while `ns` pings `ip` every 20 ms; seconds from the event's end to the next reply."""
    pinger = ns.spawn("ping", "-n", "-D", "-O", "-i", str(PING_INTERVAL), "-w", str(timeout + 10), ip, log=log)
    try:
        time.sleep(0.5)
        event()
        done = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", log.read_text(), re.MULTILINE):
                if float(stamp) > done:
                    return float(stamp) - done
            time.sleep(0.05)
        return None
    finally:
        pinger.terminate()
        pinger.wait(5)
        log.unlink(missing_ok=True)


def _until(condition, timeout: float = 30, step: float = 0.05) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(step)
    return None


def measure(rounds: int, workdir: Path) -> dict:
    lab.up(lab.Knobs(second_network=True))
    manager = lab.RunningManager(log=workdir / "recovery.log")
    samples: dict[str, list] = {"flap": [], "replug": [], "roam_lease": [], "roam_reachable": []}
    try:
        for vm in lab.VMS:
            lab.start_dhcpcd(vm)
        here = "a"
        ip = lab.wait_lease("vm1")
        for r in range(rounds):
            lanhost = lab.NETWORKS[here].lanhost.ns
            samples["flap"].append(_first_reply_after(lanhost, ip, lambda: lab.flap(1.0), workdir / "ping.log"))
            samples["replug"].append(_first_reply_after(lanhost, ip, lambda: lab.replug(absent_seconds=1.0),
                                                        workdir / "ping.log"))
            here = "b" if here == "a" else "a"
            lab.roam(here, MACS[r % 2])
            prefix = lab.NETWORKS[here].prefix4
            samples["roam_lease"].append(_until(lambda: (lab.vm_ip("vm1") or "").startswith(prefix)))
            ip = lab.vm_ip("vm1")
            reach = _until(lambda: lab.ping(lab.NETWORKS[here].lanhost.ns, ip, timeout=0.2), timeout=15, step=0)
            samples["roam_reachable"].append(None if reach is None else samples["roam_lease"][-1] + reach)
    finally:
        manager.stop()
        lab.down()
    summary = {}
    for name, values in samples.items():
        measured = [v for v in values if v is not None]
        summary[name] = {"median": statistics.median(measured) if measured else None,
                         "max": max(measured) if measured else None, "failed": len(values) - len(measured),
                         "samples": len(values)}
    return summary
