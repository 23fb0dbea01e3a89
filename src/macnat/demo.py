"""`macnat lab demo`: the problem, shown on the lab as a person would want to see it, then macnat fixing it."""

from __future__ import annotations

import time

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


def show_fix() -> bool:
    """macnat attached: returns True when the VMs became full hosts of the LAN."""
    step(f"macnat: `macnat attach {lab.LAPTOP.ifname} {lab.BRIDGE}` on the laptop (wlan0 stays a plain station)")
    started = time.monotonic()
    manager = lab.RunningManager(log=lab.STATE_DIR / "macnat.log")
    observed(True, f"attached and managing after {time.monotonic() - started:.1f} s")
    drops_before = lab.ap_drops()
    results = []
    try:
        console.print("  both VMs run dhclient (isc) again ...")
        leases = lab.dhcp_all()
        for vm, ip in leases.items():
            results.append(ip is not None)
            observed(ip is not None, f"{vm} ({lab.VMS[vm].mac}) leased {ip} from the LAN's dnsmasq")
        if all(leases.values()):
            vm1, vm2 = leases["vm1"], leases["vm2"]
            for who, ns, target in (("vm1 -> LAN host", lab.VMS["vm1"].ns, lab.LANHOST.ip),
                                    ("LAN host -> vm2", lab.LANHOST.ns, vm2),
                                    ("laptop -> vm1", lab.LAPTOP.ns, vm1),
                                    ("vm2 -> vm1", lab.VMS["vm2"].ns, vm1)):
                results.append(lab.ping(ns, target))
                observed(results[-1], f"ping {who} ({target})")
            seen = lab.neighbours(lab.LANHOST.ns)
            for ip in (vm1, vm2):
                results.append(seen.get(ip) == lab.LAPTOP.mac)
                observed(results[-1], f"the LAN host sees {ip} at {seen.get(ip)}, wlan0's MAC")
            console.print("  IPv6: SLAAC from the router's advertisements, DHCPv6 from dnsmasq ...")
            slaac, dhcp6 = lab.wait_slaac("vm1"), lab.dhcp6("vm1")
            results.append(bool(dhcp6))
            observed(results[-1], f"vm1 has {slaac} (SLAAC) and {dhcp6} (DHCPv6)")
            for who, ns, target in (("LAN host -> vm1", lab.LANHOST.ns, slaac),
                                    ("vm1 -> LAN host", lab.VMS["vm1"].ns, lab.LANHOST.ip6)):
                results.append(lab.ping(ns, target))
                observed(results[-1], f"ping {who} ({target})")
            console.print("  macnat table:")
            console.print("    " + lab.macnat("table").stdout.rstrip().replace("\n", "\n    "))
        results.append(lab.ap_drops() == drops_before)
        observed(results[-1], "the access point dropped nothing from the laptop")
    finally:
        code = manager.stop()
        gone = lab.macnat("status").stdout.strip() == "macnat is not attached in this network namespace"
        results.append(code == 0 and gone)
        observed(results[-1], "SIGTERM: macnat detached and left nothing behind")
    return all(results)


def run() -> bool:
    step("Building the lab: an access point, a router with dnsmasq (DHCPv4, RA, DHCPv6), a LAN host, "
         "a laptop with wlan0 and vmbr0, 2 VMs")
    lab.up(lab.Knobs(ipv6=True))
    observed(True, f"lab up: namespaces {', '.join(ns.name for ns in lab.namespaces())}")
    problem_shown = show_problem()
    fixed = show_fix()
    if problem_shown and fixed:
        verdict = "[green]plain bridging fails through a Wi-Fi AP; with macnat the VMs are full hosts of the LAN[/]"
    elif not problem_shown:
        verdict = "[red]the lab did not show the problem as expected[/]"
    else:
        verdict = f"[red]macnat did not make the VMs work: see {lab.STATE_DIR / 'macnat.log'}[/]"
    console.print(f"\n[bold]Verdict:[/bold] {verdict}. `macnat lab down` removes the lab.")
    return problem_shown and fixed
