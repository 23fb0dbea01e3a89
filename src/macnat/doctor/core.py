"""What every check shares: the verdicts, the result a check returns, the registry the checks join,
the context they read the system through, and which Wi-Fi interfaces and bridges are checked.

A check is a function decorated with @check: it returns a Result (or None when it does not apply,
e.g. the bridge checks when no bridge is known) and never changes the system, except for the probes
that say so in their docstring (the kernel feature probe in a private network namespace, the ARP
requests of the access point checks, the 4-address probe).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from macnat import config, netlink

OK, WARNING, ERROR = "ok", "warning", "error"
SEVERITY = {OK: 0, WARNING: 1, ERROR: 2}
# Exit status by the worst finding. 1 (macnat could not run) and 2 (a usage error) keep the meaning
# they have for every macnat command, so a script can tell "doctor found problems" from "doctor failed".
EXIT_STATUS = {OK: 0, WARNING: 3, ERROR: 4}
DOCS = "docs/troubleshooting.md"
# Every system file doctor reads (but the config files, which macnat.config finds) is taken relative
# to this root, so the tests can seed a NetworkManager, systemd or ifupdown2 configuration without
# touching the machine's own /etc.
ROOT = Path(os.environ.get("MACNAT_DOCTOR_ROOT", "/"))


@dataclass(frozen=True)
class Result:
    verdict: str
    found: str                        # what the check saw, for people
    fix: str | None = None            # the exact command or config line, for anything not ok
    topic: str | None = None          # its entry in docs/troubleshooting.md (see macnat.doctor.topics)
    details: dict = field(default_factory=dict)  # the same facts for scripts (--json)


def ok(found: str, **details) -> Result:
    return Result(OK, found, details=details)


def warning(found: str, fix: str, topic: str, **details) -> Result:
    return Result(WARNING, found, fix, topic, details)


def error(found: str, fix: str, topic: str, **details) -> Result:
    return Result(ERROR, found, fix, topic, details)


@dataclass(frozen=True)
class Target:
    """One Wi-Fi interface and the bridge its VMs are on (None when nothing names one)."""

    wifi: str
    bridge: str | None
    bridge_from: str | None           # "the command line", "the config file", "the attachment"

    def describe(self) -> str:
        return f"{self.wifi} <-> {self.bridge}" if self.bridge else f"{self.wifi} (no bridge known)"


@dataclass(frozen=True)
class Check:
    group: str
    id: str
    title: str                        # what is checked, with {wifi} and {bridge} filled in per target
    run: Callable
    per_target: bool
    needs_root: bool


REGISTRY: list[Check] = []


def check(group: str, id: str, title: str, per_target: bool = True, needs_root: bool = False):
    """Register a check: fn(ctx, target) per target, or fn(ctx) once for the whole system."""
    def register(fn: Callable) -> Callable:
        REGISTRY.append(Check(group, id, title, fn, per_target, needs_root))
        return fn
    return register


@dataclass(frozen=True)
class Finding:
    id: str
    group: str
    title: str
    wifi: str | None
    bridge: str | None
    verdict: str
    found: str
    fix: str | None
    doc: str | None                   # "docs/troubleshooting.md#anchor"
    details: dict

    def to_json(self) -> dict:
        return {"id": self.id, "group": self.group, "title": self.title, "wifi": self.wifi, "bridge": self.bridge,
                "verdict": self.verdict, "found": self.found, "fix": self.fix, "doc": self.doc,
                "details": self.details}


class Context:
    """The system as the checks see it, each fact read once and shared."""

    def __init__(self, ipr: IPRoute, is_root: bool | None = None, root: Path = ROOT):
        self.ipr = ipr
        self.is_root = os.geteuid() == 0 if is_root is None else is_root
        self.root = root
        self.targets: list[Target] = []
        self.cache: dict = {}
        self._attachments: dict = {}

    def system_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def link(self, name: str | None) -> netlink.Link | None:
        if not name:
            return None
        return netlink.find_link(self.ipr, name)

    def attachment(self, wifi: str):
        """macnat's attachment on `wifi` (its maps are open until close()), or None."""
        if not self.is_root:
            return None
        if wifi not in self._attachments:
            from macnat import attachment

            self._attachments[wifi] = attachment.find(self.ipr, wifi)
        return self._attachments[wifi]

    def cached(self, key, compute: Callable):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def close(self) -> None:
        for found in self._attachments.values():
            if found is not None:
                found.close()


def configured_bridge(wifi: str) -> str | None:
    """The bridge the config file (and MACNAT_* environment) names for `wifi`; None if none or unreadable
    (the config check reports why)."""
    try:
        return config.resolve(wifi, {}).settings.bridge
    except config.ConfigError:
        return None


def target_for(ctx: Context, wifi: str, bridge: str | None = None) -> Target:
    """`wifi` with the bridge given, else the config file's, else the running attachment's."""
    if bridge:
        return Target(wifi, bridge, "the command line")
    configured = configured_bridge(wifi)
    if configured:
        return Target(wifi, configured, "the config file")
    found = ctx.attachment(wifi)
    if found is not None and found.bridge is not None:
        return Target(wifi, found.bridge.name, "the attachment")
    return Target(wifi, None, None)


def find_targets(ctx: Context, wifi: str | None, bridge: str | None, candidates: Callable[[Context], set[str]]) -> list[Target]:
    """What to check: WIFI (and BRIDGE) as given, or every candidate Wi-Fi interface."""
    if wifi:
        return [target_for(ctx, wifi, bridge)]
    return [target_for(ctx, name) for name in sorted(candidates(ctx))]
