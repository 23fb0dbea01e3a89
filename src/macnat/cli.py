"""The `macnat` command line: a thin layer over the modules that do the work.

Exit codes: 0 success, 1 a MacnatError (one line on stderr saying what to do), 2 usage errors (typer).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from macnat.errors import MacnatError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Put VMs on a Wi-Fi LAN as full hosts: MAC address translation in the kernel.")
lab_app = typer.Typer(no_args_is_help=True, help="The emulated Wi-Fi LAN in network namespaces (mnlab-*; MACNAT_NS_PREFIX=xy makes them xylab-*).")
app.add_typer(lab_app, name="lab")


def console():
    """Rich output; piped output is not cut to 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def require_root() -> None:
    if os.geteuid() != 0:
        raise MacnatError("must run as root (macnat loads BPF programs and changes network devices)")


def parse_statics(entries: list[str]) -> dict[str, str]:
    from macnat.maps import ip_key, mac_bytes

    statics = {}
    for entry in entries:
        ip, sep, mac = entry.partition("=")
        if not sep:
            raise MacnatError(f"--static takes IP=MAC, got '{entry}'")
        try:
            ip_key(ip)
        except OSError:
            raise MacnatError(f"--static: '{ip}' is not an IPv4 or IPv6 address") from None
        mac_bytes(mac)
        statics[ip] = mac.lower()
    return statics


@app.command()
def attach(
    wifi: Annotated[str, typer.Argument(help="The Wi-Fi station interface, e.g. wlan0")],
    bridge: Annotated[str, typer.Argument(help="The bridge the VMs are on, e.g. vmbr0")],
    age: Annotated[float, typer.Option(help="Seconds a learned binding lives without traffic (probed before)")] = 300,
    static: Annotated[Optional[list[str]], typer.Option(help="A static binding IP=MAC (repeatable)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also log probes")] = False,
) -> None:
    """Attach macnat between WIFI and BRIDGE and manage it in the foreground until SIGTERM/SIGINT.

    An attachment left by a manager that died is adopted, with everything it learned.
    """
    import threading
    from concurrent.futures import Future

    from macnat import loader

    require_root()
    if age <= 0:
        raise MacnatError("--age must be positive")
    statics = parse_statics(static or [])
    # The compile (about 1.5 s, in C: the GIL is released) runs while this thread gets the rest ready.
    # A daemon thread: when the checks below fail, the error comes at once, not after the compile.
    compiling: Future = Future()

    def compile_datapath() -> None:
        try:
            compiling.set_result(loader.compile_datapath())
        except BaseException as exc:  # handed to compiling.result() below
            compiling.set_exception(exc)

    threading.Thread(target=compile_datapath, daemon=True).start()

    from pyroute2 import IPRoute

    from macnat import attachment
    from macnat.manager import Settings, exec_manager, setup_logging

    setup_logging(verbose)
    log = logging.getLogger("macnat")
    with IPRoute() as ipr:
        wifi_link, _ = loader.validate(ipr, wifi, bridge)
        lock = attachment.ManagerLock(wifi_link)
        if not lock.acquire():
            raise MacnatError(f"'{wifi}' is already attached and managed by pid {lock.holder()} "
                              f"(macnat detach {wifi} stops it)")
        try:
            found = attachment.find(ipr, wifi)
            if found is None:
                loader.attach(ipr, wifi, bridge, compiling.result())
                log.info("attached to %s and %s", wifi, bridge)
            else:
                found.close()
                if found.bridge is None or found.bridge.name != bridge:
                    raise MacnatError(f"'{wifi}' is attached to '{found.bridge.name if found.bridge else '?'}', "
                                      f"not '{bridge}' (macnat detach {wifi} first)")
                if not found.complete:
                    raise MacnatError(f"the attachment on '{wifi}' is incomplete: macnat detach {wifi}, then attach")
                log.info("adopting the running datapath on %s (its manager is gone)", wifi)
        except BaseException:
            lock.release()
            raise
    exec_manager(wifi, Settings(age=age, statics=statics), lock, fresh=found is None, verbose=verbose)


@app.command()
def detach(wifi: Annotated[Optional[str], typer.Argument(help="The Wi-Fi interface (default: every attachment)")] = None) -> None:
    """Detach macnat: stop its manager if one runs, remove its programs, uplink and settings."""
    import signal
    import time

    from macnat import attachment

    for found in _attachments(wifi):
        lock = attachment.ManagerLock(found.wifi)
        pid = lock.holder()
        if pid and pid > 0:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while lock.holder() and time.monotonic() < deadline:
                time.sleep(0.02)
        found.detach()  # all of it without a manager; whatever a manager that did not finish left
        lock.discard_if_stale()
        found.close()
        typer.echo(f"detached from {found.wifi.name}")


def _attachments(wifi: Optional[str]):
    from pyroute2 import IPRoute

    from macnat import attachment

    require_root()
    with IPRoute() as ipr:
        found = [attachment.require(ipr, wifi)] if wifi else attachment.find_all(ipr)
    if not found:
        raise MacnatError("macnat is not attached to anything in this network namespace")
    return found


WifiOption = Annotated[Optional[str], typer.Option("--wifi", help="Only this Wi-Fi interface's attachment")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON")]


@app.command()
def table(wifi: WifiOption = None, as_json: JsonOption = False) -> None:
    """The VMs' address bindings: IP, MAC, kind, last seen, packets and bytes."""
    from rich.table import Table

    from macnat import constants
    from macnat.manager import monotonic_ns
    from macnat.maps import ip_family, ip_str, mac_str

    rows = []
    now = monotonic_ns()
    for found in _attachments(wifi):
        for key, b in found.maps.bindings.items():
            rows.append({"ip": ip_str(key), "family": ip_family(key), "mac": mac_str(b.mac),
                         "kind": "static" if b.flags & constants.BINDING_STATIC else "learned",
                         "last_seen_s": round(max(0, now - b.last_seen_ns) / 1e9, 1), "wifi": found.wifi.name,
                         "tx_packets": b.tx_packets, "tx_bytes": b.tx_bytes,
                         "rx_packets": b.rx_packets, "rx_bytes": b.rx_bytes})
        found.close()
    rows.sort(key=lambda r: (r["wifi"], r["family"], ipaddress.ip_address(r["ip"])))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    out = Table("IP", "MAC", "kind", "last seen", "to Wi-Fi pkts/bytes", "from Wi-Fi pkts/bytes", "Wi-Fi")
    for r in rows:
        out.add_row(r["ip"], r["mac"], r["kind"], f"{r['last_seen_s']} s ago",
                    f"{r['tx_packets']}/{r['tx_bytes']}", f"{r['rx_packets']}/{r['rx_bytes']}", r["wifi"])
    console().print(out)


@app.command()
def stats(wifi: WifiOption = None, as_json: JsonOption = False) -> None:
    """The datapath's counters: translated each way, learned, passed to the host, dropped by reason."""
    from rich.table import Table

    from macnat import constants

    result = {}
    for found in _attachments(wifi):
        result[found.wifi.name] = found.maps.counter_totals()
        found.close()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for name, counters in result.items():
        out = Table("counter", "value", "meaning", title=f"macnat on {name}")
        for counter, value in counters.items():
            out.add_row(counter, str(value), constants.COUNTERS[counter])
        console().print(out)


@app.command()
def status(as_json: JsonOption = False) -> None:
    """What is attached where, and whether a manager runs for it."""
    from pyroute2 import IPRoute

    from macnat import attachment

    require_root()
    with IPRoute() as ipr:
        found = attachment.find_all(ipr)
        described = [a.describe() for a in found]
        for a in found:
            a.close()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    if not described:
        typer.echo("macnat is not attached in this network namespace")
    for d in described:
        manager = f"manager pid {d['manager_pid']}" if d["manager_pid"] else "no manager (datapath runs unmanaged)"
        typer.echo(f"{d['wifi']} ({d['wifi_mac']}) <-> {d['bridge']} via {d['uplink']}: "
                   f"programs {d['programs']}; {manager}" + ("" if d["complete"] else "; INCOMPLETE"))


@lab_app.command("up")
def lab_up(
    ap_filter: Annotated[bool, typer.Option(help="AP drops frames of unassociated MACs (off: a 4-address/WDS AP)")] = True,
    mcast_to_ucast: Annotated[bool, typer.Option(help="AP delivers broadcast/multicast as unicast to the station")] = False,
    ipv6: Annotated[bool, typer.Option(help="The router also serves RA and DHCPv6")] = False,
) -> None:
    """Build the lab (replacing any lab already there)."""
    from macnat import lab

    require_root()
    lab.up(lab.Knobs(ap_filter=ap_filter, mcast_to_ucast=mcast_to_ucast, ipv6=ipv6))
    typer.echo("lab is up: " + ", ".join(ns.name for ns in lab.namespaces()))


@lab_app.command("down")
def lab_down() -> None:
    """Remove the lab: namespaces, processes and files."""
    from macnat import lab

    require_root()
    lab.down()
    typer.echo("lab is down")


@lab_app.command("status")
def lab_status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Show whether the lab is up, its knobs, addresses and the AP's drop counters."""
    from macnat import lab

    require_root()
    info = lab.status()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    if not info["up"]:
        typer.echo("lab is down" + (f" (partial: {', '.join(info['namespaces'])})" if info["namespaces"] else ""))
        return
    typer.echo(f"lab is up; AP: {info['knobs']}; AP drops: {info['ap_drops']}")
    typer.echo(f"laptop: {info['laptop']}")
    for name, vm in info["vms"].items():
        typer.echo(f"{name}: {vm}")


@lab_app.command("demo")
def lab_demo() -> None:
    """Show the problem on the lab, step by step, and what macnat does about it."""
    from macnat import demo

    require_root()
    if not demo.run():
        raise typer.Exit(1)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A short smoke run (what CI runs): too short for conclusions")] = False,
    rounds: Annotated[Optional[int], typer.Option(help="Interleaved lab rounds (default 10; 1 with --quick)")] = None,
    output: Annotated[Path, typer.Option(help="Where benchmarks.md and benchmarks.png go")] = Path("docs"),
) -> None:
    """Measure macnat next to plain bridging and the alternatives, side by side, on the lab.

    Needs the lab's tools and the alternatives (ebtables, iptables, parprouted, dhcp-helper), as
    ./setup.sh installs them. Replaces any lab that is up.
    """
    require_root()
    try:
        from macnat import bench as benchmarks
    except ImportError as exc:
        raise MacnatError(f"the benchmarks need {exc.name}: pip install 'macnat[bench]'") from None
    report = benchmarks.run(quick, rounds, output, say=lambda text: typer.echo(text, err=True))
    typer.echo(f"wrote {report} and {report.with_suffix('.png')}")


def main() -> None:
    try:
        app()
    except MacnatError as exc:
        print(f"macnat: error: {exc}", file=sys.stderr)
        sys.exit(1)
