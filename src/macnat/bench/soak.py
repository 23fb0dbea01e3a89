"""`macnat soak`: the lab under a long, steady load with a laptop's events along the way, for the
numbers a long run shows and a short one hides: loss, the manager's memory and CPU over time, table
sizes over time, log lines per hour.

Two phases with the same traffic, measured in one run:
- baseline: plain bridging through a 4-address AP (what loss the lab itself has);
- macnat: `macnat attach --age 20` (ageing and probing busy), new VMs arriving (DHCP) and leaving
  (one every 30 s in a 30-minute soak, each with a new MAC),
  and, a third of the way, a Wi-Fi flap (wlan0 down 1 s, in the baseline too); two thirds of the
  way, the manager killed and started again (it adopts the datapath).

Traffic in both: a ping every 100 ms from the LAN host to each VM, UDP (1,200-byte datagrams at
20 Mbit/s) VM -> LAN and LAN -> VM, and TCP at 50 Mbit/s each way. Loss is counted per ping sequence
number and from iperf3's UDP reports; the flap's window (from wlan0 down until 3 s after it is up)
is counted apart, since no setup delivers over a Wi-Fi that is down.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

from macnat import lab
from macnat.bench import manager_scale, setups, traffic
from macnat.datapath import Datapath

PING_INTERVAL = 0.1
FLAP_DOWN_S = 1.0
FLAP_WINDOW_AFTER_S = 3.0
UDP = ["-u", "-b", "20M", "-l", "1200"]
TCP = ["-b", "50M"]
FLOWS = {"udp_up": (UDP, False, 5211), "udp_down": (UDP, True, 5212), "tcp_up": (TCP, False, 5213),
         "tcp_down": (TCP, True, 5214)}
AGE = "20"
ARRIVALS = 60           # new VMs over a soak: enough that a manager meets many in each of its lives


class Load:
    """The phase's traffic: pings to every VM and four iperf3 flows, started together, read at the end."""

    def __init__(self, workdir: Path, seconds: int, phase: str):
        self.workdir, self.phase = workdir, phase
        lanhost = lab.LANHOST
        self.pingers = {vm: lanhost.ns.spawn("ping", "-n", "-D", "-O", "-i", str(PING_INTERVAL), "-w", str(seconds),
                                             setups.vm_address(vm), log=workdir / f"{phase}-ping-{vm}.log")
                        for vm in ("vm1", "vm2")}
        self.servers = [lanhost.ns.spawn("iperf3", "-s", "-1", "-B", lanhost.ip, "-p", str(port))
                        for _, _, port in FLOWS.values()]
        time.sleep(0.5)
        self.clients = {name: lab.VMS["vm1" if name.endswith("up") else "vm2"].ns.spawn(
            "iperf3", "-c", lanhost.ip, "-p", str(port), "-t", str(max(1, seconds - 2)), "-J", "--connect-timeout",
            "3000", *args, *(["-R"] if reverse else []), log=workdir / f"{phase}-{name}.json")
            for name, (args, reverse, port) in FLOWS.items()}

    def finish(self, windows: list[tuple[float, float]]) -> dict:
        for proc in [*self.pingers.values(), *self.clients.values()]:
            proc.wait(120)
        for server in self.servers:
            server.kill()
            server.wait()
        result = {}
        for vm in self.pingers:
            result[f"ping_{vm}"] = ping_loss((self.workdir / f"{self.phase}-ping-{vm}.log").read_text(), windows)
        for name in FLOWS:
            text = (self.workdir / f"{self.phase}-{name}.json").read_text()
            end = json.loads(text[text.index("{"):])["end"]
            if name.startswith("udp"):
                result[name] = {"sent": end["sum"]["packets"], "lost": end["sum"]["lost_packets"]}
            else:
                result[name] = {"mbit_s": end["sum_received"]["bits_per_second"] / 1e6}
        return result


def ping_loss(output: str, windows: list[tuple[float, float]]) -> dict:
    """Echo requests sent, and lost outside and inside the given time windows, from `ping -D -O`."""
    sent = {int(seq): float(t) for t, seq in re.findall(r"^\[(\d+\.\d+)\] .*?icmp_seq=(\d+)", output, re.MULTILINE)}
    answered = {int(seq) for seq in re.findall(r"^\[\d+\.\d+\] \d+ bytes from .*?icmp_seq=(\d+)", output, re.MULTILINE)}
    lost = [t for seq, t in sent.items() if seq not in answered]
    inside = sum(1 for t in lost if any(a <= t <= b for a, b in windows))
    return {"sent": len(sent), "lost": len(lost) - inside, "lost_in_flap": inside}


def flap() -> tuple[float, float]:
    started = time.time()
    lab.flap(FLAP_DOWN_S)
    return started, time.time() + FLAP_WINDOW_AFTER_S


class Sampler:
    """The manager's RSS and CPU, the tables' sizes and the log's length, every `interval` seconds."""

    def __init__(self, log: Path, interval: float):
        self.log, self.interval, self.samples = log, interval, []
        self.last = None

    def sample(self, pid: int, started: float) -> None:
        now = time.monotonic()
        cpu = manager_scale.cpu_seconds(pid)
        if self.last and self.last[0] == pid:
            cpu_percent = (cpu - self.last[1]) / (now - self.last[2]) * 100
        else:
            cpu_percent = None  # a new manager (restarted): no interval yet
        self.last = (pid, cpu, now)
        (found,) = json.loads(lab.macnat("status", "--json").stdout)
        datapath = Datapath.from_ids(found["programs"])
        try:
            sizes = {name: getattr(datapath.maps, name).snapshot().count for name in ("bindings", "vm_macs", "lan_macs")}
        finally:
            datapath.close()
        memory = manager_scale.resident_mb(pid)
        self.samples.append({"t": now - started, "pid": pid, "rss_mb": memory["rss"], "anon_mb": memory["anon"],
                             "file_mb": memory["file"],
                             "cpu_percent": cpu_percent, **sizes,
                             "log_lines": len(self.log.read_text().splitlines()) if self.log.exists() else 0})


def baseline(seconds: int, workdir: Path, say) -> dict:
    say(f"baseline: plain bridging through a 4-address AP, {seconds} s")
    setup = setups.PlainBridge()
    with setups.active(setup, workdir):
        load = Load(workdir, seconds, "baseline")
        started = time.monotonic()
        time.sleep(seconds / 3)
        window = flap()
        time.sleep(max(0, seconds - (time.monotonic() - started)))
        return load.finish([window])


def with_macnat(seconds: int, workdir: Path, say, sample_every: float) -> dict:
    say(f"macnat: {seconds} s with VMs arriving and leaving, a flap and a manager restart")
    setups.set_vm_addresses(setups.VM_PREFIX, lab.GATEWAY)
    log = workdir / "soak-manager.log"
    manager = lab.RunningManager("--age", AGE, log=log)
    setups.forget_neighbours()
    traffic.wait_reachable(lab.VMS["vm1"].ns, lab.LANHOST.ip)
    sampler = Sampler(log, sample_every)
    arrivals = {"started": 0, "leased": 0, "reached": 0}
    windows = []
    restarted = False
    try:
        load = Load(workdir, seconds, "macnat")
        started = time.monotonic()
        next_sample, next_vm, flapped, serial = started, started + 5, False, 0
        while (elapsed := time.monotonic() - started) < seconds:
            if time.monotonic() >= next_sample:
                sampler.sample(manager.proc.pid, started)
                next_sample += sample_every
            if not flapped and elapsed >= seconds / 3:
                windows.append(flap())
                flapped = True
                say("   flapped wlan0")
            if not restarted and elapsed >= 2 * seconds / 3:
                manager.stop(signal.SIGKILL)
                manager = lab.RunningManager("--age", AGE, log=log)
                restarted = True
                say("   killed the manager and started it again (it adopted the datapath)")
            if time.monotonic() >= next_vm and elapsed < seconds - 20:
                serial += 1
                arrivals.update(churn(serial, arrivals))
                next_vm = time.monotonic() + max(10.0, seconds / ARRIVALS)
            time.sleep(0.2)
        result = load.finish(windows)
        sampler.sample(manager.proc.pid, started)
    finally:
        manager.stop()
    return {**result, "arrivals": arrivals, "samples": sampler.samples, "log": log.read_text()}


def churn(serial: int, counts: dict) -> dict:
    """A new VM starts, asks for a lease, is reached from the LAN; the previous new one goes away."""
    for name in [n for n in lab.VMS if n.startswith("soak")]:
        lab.remove_vm(name)
    name = f"soak{serial}"
    lab.add_vm(name, f"52:54:00:00:05:{serial % 256:02x}")
    counts = dict(counts, started=counts["started"] + 1)
    ip = lab.dhcp(name)
    if ip:
        counts["leased"] += 1
        counts["reached"] += lab.ping(lab.LANHOST.ns, ip)
    return counts


def run(minutes: float, output: Path, say=print) -> Path:
    seconds = int(minutes * 60)
    base_seconds = max(15, min(300, seconds // 4))
    sample_every = 10.0 if seconds >= 600 else 5.0
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="macnat-soak-") as tmp:
        workdir = Path(tmp)
        setups.prepare_lab()
        try:
            results = {"minutes": minutes, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                       "baseline_seconds": base_seconds, "seconds": seconds,
                       "baseline": baseline(base_seconds, workdir, say),
                       "macnat": with_macnat(seconds, workdir, say, sample_every)}
        finally:
            lab.down()
    report = output / "soak.md"
    report.write_text(render(results))
    return report


WARM_UP_S = 120.0        # a manager's first minutes fill its caches and arenas: not growth
FLAT_MB_PER_HOUR = 1.0


def memory_growth(samples: list[dict], part: str = "rss_mb") -> dict[int, float]:
    """MB per hour that each manager's resident memory (or `part` of it) grew by, after its warm-up (a
    restarted manager is another process, and starts over)."""
    lives: dict[int, list[tuple[float, float]]] = {}
    for s in samples:
        lives.setdefault(s["pid"], []).append((s["t"], s[part]))
    rates = {}
    for pid, points in lives.items():
        settled = [(t, mb) for t, mb in points if t - points[0][0] >= WARM_UP_S]
        if len(settled) >= 3:
            rates[pid] = statistics.linear_regression([t for t, _ in settled], [mb for _, mb in settled]).slope * 3600
    return rates


def growth_text(rates: dict[int, float]) -> str:
    return ", ".join(f"pid {pid} {rate:+.1f} MB/h" for pid, rate in rates.items()) or "none (no manager outlived its warm-up)"


def loss_rate(row: dict) -> float:
    return row["lost"] / row["sent"] if row["sent"] else 0.0


def render(r: dict) -> str:
    base, mac = r["baseline"], r["macnat"]
    samples = mac["samples"]
    out = [
        "# macnat soak",
        "",
        f"Measured {r['date']} by `macnat soak --minutes {r['minutes']:g}`: {r['baseline_seconds']} s of baseline, "
        f"then {r['seconds']} s with macnat.",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        "## Loss",
        "",
        "| flow | plain bridging | macnat | beyond the baseline | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    worst = 0.0
    for name in ("ping_vm1", "ping_vm2", "udp_up", "udp_down"):
        b, m = base[name], mac[name]
        beyond = loss_rate(m) - loss_rate(b)
        worst = max(worst, beyond)
        flap_note = f" (+{m['lost_in_flap']} in the flap)" if "lost_in_flap" in m else ""
        out.append(f"| {name} | {b['lost']}/{b['sent']} ({loss_rate(b):.3%}) | {m['lost']}/{m['sent']} "
                   f"({loss_rate(m):.3%}){flap_note} | {beyond:+.3%} | {'met' if beyond <= 0 else '**missed**'} (0) |")
    for name in ("tcp_up", "tcp_down"):
        out.append(f"| {name} | {base[name]['mbit_s']:.1f} Mbit/s | {mac[name]['mbit_s']:.1f} Mbit/s | | |")
    arrivals = mac["arrivals"]
    rss = [s["rss_mb"] for s in samples]
    cpu = [s["cpu_percent"] for s in samples if s["cpu_percent"] is not None]
    hours = r["seconds"] / 3600
    lines = len(mac["log"].splitlines())
    growth = memory_growth(samples)
    steepest = max(growth.values(), key=abs) if growth else 0.0
    out += [
        "",
        f"New VMs: {arrivals['started']} started, {arrivals['leased']} leased, {arrivals['reached']} reached from the LAN.",
        "",
        "## The manager over time",
        "",
        f"- resident memory: {min(rss):.1f}-{max(rss):.1f} MB; its growth per hour, by the least-squares slope over "
        f"each manager's life after its first {WARM_UP_S:g} s: "
        + growth_text(growth)
        + f" ({'flat: met' if abs(steepest) < FLAT_MB_PER_HOUR else '**growing: missed**'}, target under "
        f"{FLAT_MB_PER_HOUR:g} MB/h)",
        "- of which anonymous (what it allocated): "
        + growth_text(memory_growth(samples, "anon_mb"))
        + "; file-backed (library pages it has run): " + growth_text(memory_growth(samples, "file_mb")),
        f"- CPU: median {statistics.median(cpu) if cpu else 0:.3f}%, max {max(cpu) if cpu else 0:.3f}% of one core",
        f"- tables: bindings {min(s['bindings'] for s in samples)}-{max(s['bindings'] for s in samples)}, VM MACs "
        f"{min(s['vm_macs'] for s in samples)}-{max(s['vm_macs'] for s in samples)}, LAN MACs "
        f"{min(s['lan_macs'] for s in samples)}-{max(s['lan_macs'] for s in samples)} (bounded by the VMs and hosts "
        "that exist, not by time)",
        f"- log: {lines} lines, {lines / hours:.0f} per hour",
        "",
        "| t (s) | manager pid | RSS (MB) | anonymous / file (MB) | CPU (%) | bindings | VM MACs | LAN MACs | log lines |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in samples:
        cpu_cell = "" if s["cpu_percent"] is None else f"{s['cpu_percent']:.2f}"
        out.append(f"| {s['t']:.0f} | {s['pid']} | {s['rss_mb']:.1f} | {s['anon_mb']:.1f} / {s['file_mb']:.1f} | "
                   f"{cpu_cell} | {s['bindings']} | "
                   f"{s['vm_macs']} | {s['lan_macs']} | {s['log_lines']} |")
    out += ["", f"Worst loss beyond the baseline: {worst:+.3%}.", ""]
    return "\n".join(out)
