"""`macnat doctor [WIFI [BRIDGE]]`: whose fault is it when a VM has no network, the user's, macnat's or
the access point's?

Checks, one module per group, each finding one line with a verdict (ok, warning, error), what was
found and, for anything not ok, the exact fix and its entry in docs/troubleshooting.md:

- prerequisites: root, kernel features (probed), bcc, kernel headers (a SCHED_CLS compile);
- service: the settings file, macnat@.service and whether they agree, the running attachment;
- interfaces: the Wi-Fi station (nl80211) and the bridge;
- conflicts: parprouted & co, NAT, proxy ARP sysctls, ifupdown2, NetworkManager;
- access_point: what macnat's counters and tables, and ARP requests from the host, show of the AP.

It runs where macnat was never started and needs no compiled datapath. Exit status by the worst
finding: 0 all ok, 3 a warning, 4 an error (1 and 2 keep their meaning: doctor could not run, usage).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute

from macnat import attachment, nl80211
# The groups, in the order they are reported: importing them registers their checks.
from macnat.doctor import access_point, conflicts, interfaces, prerequisites, service  # noqa: F401
from macnat.doctor import topics
from macnat.doctor.core import (DOCS, ERROR, EXIT_STATUS, OK, REGISTRY, SEVERITY, Context, Finding, Result, Target,
                                find_targets)

GROUPS = {"prerequisites": "Prerequisites", "service": "Configuration and service", "interfaces": "Interfaces",
          "conflicts": "Conflicting setups", "access_point": "The access point"}


@dataclass
class Report:
    targets: list[Target]
    findings: list[Finding]

    @property
    def worst(self) -> str:
        return max((f.verdict for f in self.findings), key=SEVERITY.get, default=OK)

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.worst]

    def to_json(self) -> dict:
        return {"targets": [{"wifi": t.wifi, "bridge": t.bridge, "bridge_from": t.bridge_from} for t in self.targets],
                "findings": [f.to_json() for f in self.findings], "worst": self.worst, "exit_status": self.exit_status}


def candidates(ctx: Context) -> set[str]:
    """Wi-Fi interfaces worth checking when none is given: attached, configured, enabled, or a station here."""
    names = service.config_files() | set(service.enabled_instances(ctx))
    if ctx.is_root:
        for found in attachment.find_all(ctx.ipr):
            names.add(found.wifi_name)
            found.close()
    try:
        with nl80211.open_iw() as iw:
            names |= {i.name for i in nl80211.interfaces(iw) if i.iftype == nl80211.STATION}
    except nl80211.Unavailable:
        pass
    return names


def _finding(check, target: Target | None, result) -> Finding:
    names = {"wifi": target.wifi if target else None, "bridge": (target.bridge if target else None) or "the bridge"}
    return Finding(check.id, check.group, check.title.format(**names), target.wifi if target else None,
                   target.bridge if target else None, result.verdict, result.found, result.fix,
                   f"{DOCS}#{result.topic}" if result.topic else None, result.details)


def diagnose(wifi: str | None = None, bridge: str | None = None) -> Report:
    with IPRoute() as ipr:
        ctx = Context(ipr)
        try:
            ctx.targets = find_targets(ctx, wifi, bridge, candidates)
            findings = []
            for check in sorted(REGISTRY, key=lambda c: list(GROUPS).index(c.group)):
                if check.needs_root and not ctx.is_root:
                    continue
                for target in ctx.targets if check.per_target else [None]:
                    try:
                        result = check.run(ctx, target) if check.per_target else check.run(ctx)
                    except Exception as exc:  # one broken check must not hide the others' findings
                        result = Result(ERROR, f"the check itself failed: {type(exc).__name__}: {exc}",
                                        "report it to macnat's issue tracker, with this output", topics.CHECK_FAILED)
                    if result is not None:
                        findings.append(_finding(check, target, result))
        finally:
            ctx.close()
    return Report(ctx.targets, findings)
