"""The `macnat` command line: a thin layer over the modules that do the work.

Exit codes: 0 success, 1 a MacnatError (one line on stderr saying what to do), 2 usage errors (typer).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from macnat.errors import MacnatError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Put VMs on a Wi-Fi LAN as full hosts: MAC address translation in the kernel.")
lab_app = typer.Typer(no_args_is_help=True, help="The emulated Wi-Fi LAN in network namespaces (mnlab-*).")
app.add_typer(lab_app, name="lab")


def require_root() -> None:
    if os.geteuid() != 0:
        raise MacnatError("must run as root (macnat loads BPF programs and changes network devices)")


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


def main() -> None:
    try:
        app()
    except MacnatError as exc:
        print(f"macnat: error: {exc}", file=sys.stderr)
        sys.exit(1)
