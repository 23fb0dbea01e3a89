"""The `macnat` command line: a thin layer over the modules that do the work.

Exit codes: 0 success, 1 a MacnatError (one line on stderr saying what to do), 2 usage errors (typer),
78 a bad setting (EX_CONFIG: the service unit does not restart on it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from macnat.errors import MacnatError

# add_completion: typer answers shell completion (_MACNAT_COMPLETE=complete_bash ...) only with it on; the
# Debian package ships the scripts it makes (_MACNAT_COMPLETE=source_bash macnat), pipx users have --install-completion.
app = typer.Typer(no_args_is_help=True)
config_app = typer.Typer(no_args_is_help=True, help="The settings file of a Wi-Fi interface (/etc/macnat/WIFI.toml).")
app.add_typer(config_app, name="config")
lab_app = typer.Typer(no_args_is_help=True, help="The emulated Wi-Fi LAN in network namespaces (mnlab-*; MACNAT_NS_PREFIX=xy makes them xylab-*).")
app.add_typer(lab_app, name="lab")


def console():
    """Rich output; piped output is not cut to 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def require_root() -> None:
    if os.geteuid() != 0:
        raise MacnatError("must run as root (macnat loads BPF programs and changes network devices)")


def version_callback(value: bool) -> None:
    if value:
        from macnat import __version__

        typer.echo(f"macnat {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit")] = False,
) -> None:
    """Put VMs on a Wi-Fi LAN as full hosts: MAC address translation in the kernel."""


def resolve_settings(wifi: str, cli: dict, config_file: Optional[Path]):
    from macnat import config

    return config.resolve(wifi, {k: v for k, v in cli.items() if v is not None}, path=config_file)


ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="The settings file (default: /etc/macnat/WIFI.toml)")]


@app.command()
def attach(
    wifi: Annotated[str, typer.Argument(help="The Wi-Fi station interface, e.g. wlan0")],
    bridge: Annotated[Optional[str], typer.Argument(help="The bridge the VMs are on, e.g. vmbr0 (default: from the config file)")] = None,
    age: Annotated[Optional[float], typer.Option(help="Seconds a learned binding lives without traffic (probed before) [default: 300]")] = None,
    static: Annotated[Optional[list[str]], typer.Option(help="A static binding IP=MAC (repeatable)")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="Wait for WIFI and BRIDGE to appear if they do not exist yet")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="text, or json: one object per line")] = None,
    dhcp: Annotated[Optional[str], typer.Option(help="DHCPv4 policy: keep the VMs' chaddr; rewrite it to WIFI's MAC, "
                                                     "the VMs told apart by their client identifier (for networks "
                                                     "that check chaddr); or auto: keep until keep fails on a "
                                                     "network [default: keep]")] = None,
    config_file: ConfigOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also log probes")] = False,
) -> None:
    """Attach macnat between WIFI and BRIDGE and manage it in the foreground until SIGTERM/SIGINT.

    Settings come from the command line, then MACNAT_* variables, then /etc/macnat/WIFI.toml.
    An attachment left by a manager that died is adopted, with everything it learned.
    """
    import threading
    from concurrent.futures import Future

    from macnat import config, loader

    require_root()
    cli = {"bridge": bridge, "age": age, "wait": wait, "log_format": log_format, "dhcp": dhcp, "verbose": verbose or None}
    if static:
        try:
            cli["statics"] = config.parse_static_entries(static)
        except ValueError as exc:
            raise MacnatError(f"--static {exc}") from None
    resolved = resolve_settings(wifi, cli, config_file)
    settings = resolved.settings
    if not settings.bridge:
        raise config.ConfigError(f"no bridge for {wifi}: give it (macnat attach {wifi} vmbr0) or set bridge in "
                                 f"{resolved.path} (macnat config write {wifi} vmbr0 does)")
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

    from macnat import attachment, logs, netlink, plumbing
    from macnat.datapath import Datapath
    from macnat.manager import exec_manager

    logs.setup(settings.log_format, settings.verbose)
    log = logging.getLogger("macnat")
    with IPRoute() as ipr:
        wifi_link, bridge_link = netlink.find_link(ipr, wifi), netlink.find_link(ipr, settings.bridge)
        for name, found_link in ((wifi, wifi_link), (settings.bridge, bridge_link)):
            if found_link is None and not settings.wait:
                raise MacnatError(f"no interface named '{name}' in this network namespace "
                                  "(--wait waits for it to appear)")
        if bridge_link:
            loader.check_bridge(bridge_link)
        if wifi_link:
            loader.check_wifi(ipr, wifi_link, bridge_link)
        lock = attachment.ManagerLock(wifi)
        if not lock.acquire():
            raise MacnatError(f"'{wifi}' is already attached and managed by pid {lock.holder()} "
                              f"(macnat detach {wifi} stops it)")
        try:
            datapath = adopt_or_load(ipr, wifi, settings.bridge, compiling, log)
            if datapath is None:
                bpf = compiling.result()
                datapath = Datapath.from_bcc(bpf)
                bpf.cleanup()  # the datapath holds its own descriptors now
                plumbing.update_config(datapath.maps, build=loader.build_id())
                if wifi_link and bridge_link:
                    loader.attach(ipr, wifi, settings.bridge, datapath)
                    log.info("attached to %s and %s", wifi, settings.bridge)
                else:
                    log.info("waiting for %s", " and ".join(n for n, lk in ((wifi, wifi_link),
                                                                            (settings.bridge, bridge_link)) if not lk))
        except BaseException:
            lock.release()
            raise
    exec_manager(wifi, resolved, lock, datapath)


# An upgrade restarts the unit over the old version's datapath, whose tables may mean other things.
OTHER_BUILD = ("the datapath on %s was built by another macnat version: replacing it with this one's (the VMs' "
               "bindings are learned again from their next frames)")


def adopt_or_load(ipr, wifi: str, bridge: str, compiling, log):
    """The running datapath on `wifi` to adopt, or None when a fresh one must be loaded (a remnant the
    previous manager could not keep whole is removed first)."""
    from macnat import attachment, constants, loader
    from macnat.datapath import Datapath
    from macnat.maps import OtherBuild

    try:
        found = attachment.find(ipr, wifi)  # reads config[0]: the tables' layout is checked there
    except OtherBuild:
        log.warning(OTHER_BUILD, wifi)
        attachment.remove_other_build(ipr, wifi)
        return None
    if found is None:
        return None
    try:
        if found.bridge is not None and found.bridge.name != bridge:
            raise MacnatError(f"'{wifi}' is attached to '{found.bridge.name}', not '{bridge}' (macnat detach {wifi} first)")
        if set(found.programs) != set(constants.PROGRAMS):
            log.warning("the datapath on %s lost its %s program while no manager ran: replacing it with a fresh one",
                        wifi, ", ".join(sorted(set(constants.PROGRAMS) - set(found.programs))))
        elif found.config.build == loader.build_id():
            log.info("adopting the running datapath on %s (its manager is gone)", wifi)
            return Datapath.from_ids(found.programs)
        else:
            log.warning(OTHER_BUILD, wifi)
        found.detach()
        return None
    finally:
        found.close()


@app.command()
def detach(wifi: Annotated[Optional[str], typer.Argument(help="The Wi-Fi interface (default: every attachment)")] = None) -> None:
    """Detach macnat: stop its manager if one runs, remove its programs, uplink and settings."""
    import signal
    import time

    from macnat import attachment

    for found in _attachments(wifi):
        lock = attachment.ManagerLock(found.wifi_name)
        pid = lock.holder()
        if pid and pid > 0:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while lock.holder() and time.monotonic() < deadline:
                time.sleep(0.02)
        found.detach()  # all of it without a manager; whatever a manager that did not finish left
        lock.discard_if_stale()
        found.close()
        typer.echo(f"detached from {found.wifi_name}")


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
def table(
    wifi: WifiOption = None,
    as_json: JsonOption = False,
    mac: Annotated[Optional[str], typer.Option(help="Only this VM MAC's bindings")] = None,
    ip: Annotated[Optional[str], typer.Option(help="Only this address, or the addresses in this network (CIDR)")] = None,
    family: Annotated[Optional[str], typer.Option(help="ipv4 or ipv6")] = None,
    kind: Annotated[Optional[str], typer.Option(help="learned or static")] = None,
    by_vm: Annotated[bool, typer.Option("--by-vm", help="One row per VM: its addresses and traffic")] = False,
) -> None:
    """The VMs' address bindings: IP, MAC, kind, last seen, packets and bytes."""
    from rich.table import Table

    from macnat import tables

    try:
        keep = tables.RowFilter(mac=mac, ip=ip, family=family, kind=kind)
    except ValueError as exc:
        raise MacnatError(str(exc)) from None
    rows = []
    for found in _attachments(wifi):
        rows += tables.binding_rows(found.maps, found.wifi_name)
        found.close()
    rows = keep.keep(rows)
    if by_vm:
        vms = tables.by_vm(rows)
        if as_json:
            typer.echo(tables.json_lines(vms))
            return
        out = Table("MAC", "IPv4", "IPv6", "last seen", "to Wi-Fi pkts/bytes", "from Wi-Fi pkts/bytes", "Wi-Fi")
        for vm in vms:
            out.add_row(vm["mac"], "\n".join(vm["ipv4"]), "\n".join(vm["ipv6"]), f"{vm['last_seen_s']} s ago",
                        f"{vm['tx_packets']}/{vm['tx_bytes']}", f"{vm['rx_packets']}/{vm['rx_bytes']}", vm["wifi"])
        console().print(out)
        return
    if as_json:
        typer.echo(tables.json_lines(rows))
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
        result[found.wifi_name] = found.maps.counter_totals()
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
def watch(
    wifi: WifiOption = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes")] = 1.0,
) -> None:
    """A live view: the network, each VM's addresses and rates each way, the counters that moved (q quits)."""
    from pyroute2 import IPRoute
    from rich.console import Console

    from macnat import attachment, watch as live

    require_root()
    if interval <= 0:
        raise MacnatError("--interval must be positive")

    def find():
        with IPRoute() as ipr:
            if wifi:
                found = attachment.find(ipr, wifi)
                return [found] if found else []
            return attachment.find_all(ipr)

    live.run(find, interval, Console())


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
        network = f" on {d['network']}" if d.get("network") else ""
        typer.echo(f"{d['wifi']} ({d['wifi_mac']}) <-> {d['bridge']} via {d['uplink']}: {d['state']}{network}; "
                   f"DHCP {d['dhcp']}; programs {d['programs']}; {manager}")


@app.command()
def doctor(
    wifi: Annotated[Optional[str], typer.Argument(help="The Wi-Fi interface (default: every one attached, configured or a station)")] = None,
    bridge: Annotated[Optional[str], typer.Argument(help="The VMs' bridge (default: from the config file, else the attachment)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Whose fault is it when a VM has no network: check the prerequisites, the configuration, the
    interfaces, conflicting setups and the access point, each with a verdict and the fix.

    Exit status: 0 nothing wrong, 3 a warning at worst, 4 an error (see docs/troubleshooting.md).
    """
    from macnat import doctor as checks

    report = checks.diagnose(wifi, bridge)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        from macnat.doctor.output import print_report

        print_report(report, console())
    raise typer.Exit(report.exit_status)


@config_app.command("show")
def config_show(
    wifi: Annotated[str, typer.Argument(help="The Wi-Fi interface")],
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The settings `macnat attach WIFI` would use, and where each comes from."""
    import dataclasses

    from macnat import config

    resolved = resolve_settings(wifi, {}, config_file)
    rows = {f.name: {"value": getattr(resolved.settings, f.name), "from": resolved.sources[f.name]}
            for f in dataclasses.fields(resolved.settings) if f.name in config.BY_ATTR}
    if as_json:
        typer.echo(json.dumps({"file": str(resolved.path), "exists": resolved.path.exists(), "settings": rows}, indent=2))
        return
    from rich.table import Table

    out = Table("key", "value", "from", title=f"{resolved.path}{'' if resolved.path.exists() else ' (no such file)'}")
    for attr, row in rows.items():
        out.add_row(config.BY_ATTR[attr].key, json.dumps(row["value"]), row["from"])
    console().print(out)


@config_app.command("write")
def config_write(
    wifi: Annotated[str, typer.Argument(help="The Wi-Fi interface, e.g. wlan0")],
    bridge: Annotated[str, typer.Argument(help="The bridge the VMs are on, e.g. vmbr0")],
    age: Annotated[Optional[float], typer.Option(help="Seconds a learned binding lives without traffic")] = None,
    static: Annotated[Optional[list[str]], typer.Option(help="A static binding IP=MAC (repeatable)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file")] = False,
    config_file: ConfigOption = None,
) -> None:
    """Write the settings file for WIFI: every key documented, BRIDGE and the given options set."""
    from macnat import config

    values = {"bridge": bridge, "age": age}
    if static:
        try:
            values["statics"] = config.parse_static_entries(static)
        except ValueError as exc:
            raise MacnatError(f"--static {exc}") from None
    values = {k: config.BY_ATTR[k].check(v) if k != "statics" else v for k, v in values.items() if v is not None}
    path = config_file or config.config_path(wifi)
    if path.exists() and not force:
        raise MacnatError(f"{path} exists (--force replaces it)")
    text = config.example(wifi, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    config.read_file(path)  # what was written reads back
    typer.echo(f"wrote {path}; start it with: systemctl enable --now macnat@{wifi}")


@lab_app.command("up")
def lab_up(
    ap_filter: Annotated[bool, typer.Option(help="AP drops frames of unassociated MACs (off: a 4-address/WDS AP)")] = True,
    mcast_to_ucast: Annotated[bool, typer.Option(help="AP delivers broadcast/multicast as unicast to the station")] = False,
    chaddr_check: Annotated[bool, typer.Option(help="AP drops DHCP whose chaddr is not the station's (DHCP snooping)")] = False,
    ipv6: Annotated[bool, typer.Option(help="The router also serves RA and DHCPv6")] = False,
    second_network: Annotated[bool, typer.Option(help="A second AP on 192.168.88.0/24 to roam to")] = False,
) -> None:
    """Build the lab (replacing any lab already there)."""
    from macnat import lab

    require_root()
    lab.up(lab.Knobs(ap_filter=ap_filter, mcast_to_ucast=mcast_to_ucast, ipv6=ipv6, second_network=second_network,
                     chaddr_check=chaddr_check))
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


@lab_app.command("flap")
def lab_flap(down: Annotated[float, typer.Option(help="Seconds wlan0 stays down")] = 1.0) -> None:
    """The laptop's Wi-Fi goes down and comes back (suspend/resume, rfkill)."""
    from macnat import lab

    require_root()
    lab.flap(down)
    typer.echo(f"wlan0 was down for {down:g} s")


@lab_app.command("replug")
def lab_replug(
    mac: Annotated[Optional[str], typer.Option(help="The MAC it comes back with (default: the same)")] = None,
    absent: Annotated[float, typer.Option(help="Seconds it is away")] = 1.0,
) -> None:
    """The laptop's Wi-Fi interface is deleted and created again (a USB dongle re-plugged): a new ifindex."""
    from macnat import lab

    require_root()
    lab.replug(mac, absent)
    typer.echo("wlan0 re-created")


@lab_app.command("roam")
def lab_roam(
    network: Annotated[str, typer.Argument(help="a (192.168.77.0/24) or b (192.168.88.0/24, lab up --second-network)")],
    mac: Annotated[Optional[str], typer.Option(help="The station's MAC on the new network (default: unchanged)")] = None,
) -> None:
    """The laptop moves to the other network's AP, with another MAC if asked, and gets an address there."""
    from macnat import lab

    require_root()
    net = lab.roam(network, mac)
    typer.echo(f"on network {net.key}: wlan0 {net.laptop_ip}, gateway {net.gateway}")


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


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(help="How long macnat is soaked (plus a quarter of it, at most 5 min, of baseline)")] = 30,
    output: Annotated[Path, typer.Option(help="Where soak.md goes")] = Path("docs"),
) -> None:
    """Soak the lab: steady traffic, VMs coming and going, a flap and a manager restart; loss against plain
    bridging, the manager's memory and CPU and the tables over time. Replaces any lab that is up."""
    require_root()
    if minutes <= 0:
        raise MacnatError("--minutes must be positive")
    try:
        from macnat.bench import soak as soaking
    except ImportError as exc:
        raise MacnatError(f"the soak needs {exc.name}: pip install 'macnat[bench]'") from None
    report = soaking.run(minutes, output, say=lambda text: typer.echo(text, err=True))
    typer.echo(f"wrote {report}")


def main() -> None:
    try:
        app()
    except MacnatError as exc:
        print(f"macnat: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
