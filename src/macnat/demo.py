"""`macnat lab demo`: the problem, shown on the lab as a person would want to see it, then the fix."""

from __future__ import annotations

from rich.console import Console

from macnat import lab

console = Console(highlight=False, soft_wrap=True)


def step(text: str) -> None:
    console.print(f"\n[bold]▶ {text}[/bold]")


def observed(ok: bool, text: str) -> None:
    console.print(f"  {'[green]✓' if ok else '[red]✗'}[/] {text}")


def show_problem() -> bool:
    """Plain bridging through a 3-address AP: returns True when the failure was observed as expected."""
    step("Plain bridging: enslave wlan0 into vmbr0, as one would with a wired NIC")
    console.print("  (the lab's wlan0 is a veth and allows it; a real Wi-Fi station refuses with "
                  "'Device does not allow enslaving to a bridge')")
    lab.LAPTOP.ns.ip("link", "set", lab.LAPTOP.ifname, "master", lab.BRIDGE)
    before = lab.ap_drops()["from_unassociated"]
    try:
        console.print(f"  both VMs run dhclient (isc) for up to {lab.DHCP_TIMEOUT} s ...")
        leases = lab.dhcp_all()
        for vm, ip in leases.items():
            observed(ip is None, f"{vm} got {'no lease' if ip is None else ip}")
        drops = lab.ap_drops()["from_unassociated"] - before
        observed(drops > 0, f"the access point dropped {drops} frames from source MACs it has not associated")
    finally:
        lab.LAPTOP.ns.ip("link", "set", lab.LAPTOP.ifname, "nomaster")
        for vm in lab.VMS:
            lab.release(vm)
    console.print(
        "  Why: a 3-address Wi-Fi station may only send frames with its own MAC as source, and the AP\n"
        "  only delivers unicast addressed to that MAC. The VMs' DHCP requests carry their own MACs,\n"
        "  so the AP throws them away: no lease, and nobody on the LAN can reach the VMs.")
    return all(ip is None for ip in leases.values()) and drops > 0


def run() -> bool:
    step("Building the lab: an access point, a router with dnsmasq, a LAN host, a laptop with wlan0 and vmbr0, 2 VMs")
    lab.up()
    observed(True, f"lab up: namespaces {', '.join(ns.name for ns in lab.namespaces())}")
    problem_shown = show_problem()
    verdict = "[green]the problem is real and visible[/]" if problem_shown else "[red]the lab did not behave as expected[/]"
    console.print(f"\n[bold]Verdict:[/bold] {verdict}. `macnat lab down` removes the lab.")
    return problem_shown
