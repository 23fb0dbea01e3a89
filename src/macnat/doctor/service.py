"""Configuration and service: the settings file (read by macnat.config, as `macnat attach` reads it),
the systemd unit macnat@.service and its enabled instances, whether they agree, and the running
attachment.

An instance is enabled when systemd has a symlink /etc/systemd/system/<target>.wants/macnat@WIFI.service
(what `systemctl enable macnat@WIFI` makes); the unit is looked for where systemd loads units from.
"""

from __future__ import annotations

from pathlib import Path

from macnat import config
from macnat.doctor import topics
from macnat.doctor.core import check, error, ok, warning

GROUP = "service"
UNIT = "macnat@.service"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
ENABLED_GLOB = "etc/systemd/system/*.wants/macnat@*.service"


def unit_file(ctx) -> Path | None:
    return next((p for p in (ctx.system_path(d) / UNIT for d in UNIT_DIRS) if p.exists()), None)


def enabled_instances(ctx) -> dict[str, Path]:
    """Wi-Fi interface -> the symlink that enables macnat@WIFI."""
    return {p.name.removeprefix("macnat@").removesuffix(".service"): p for p in sorted(ctx.root.glob(ENABLED_GLOB))}


def config_files() -> set[str]:
    """The Wi-Fi interfaces that have a settings file."""
    return {p.stem for p in config.CONFIG_DIR.glob("*.toml")}


@check(GROUP, "config", "{wifi}: settings")
def settings(ctx, target):
    path = config.config_path(target.wifi)
    bridge_hint = target.bridge or "vmbr0"
    try:
        resolved = config.resolve(target.wifi, {})
    except config.ConfigError as exc:
        return error(str(exc), f"correct that key in {path}, or write a fresh documented file: "
                               f"macnat config write {target.wifi} {bridge_hint} --force", topics.BAD_CONFIG)
    configured = resolved.settings.bridge
    if target.bridge and configured and configured != target.bridge:
        return warning(f"{path} sets bridge = \"{configured}\", not {target.bridge}: macnat attach {target.wifi} "
                       f"and macnat@{target.wifi} use {configured}",
                       f'bridge = "{target.bridge}" in {path} (or: macnat doctor {target.wifi} {configured})',
                       topics.CONFIG_BRIDGE, path=str(path), bridge=configured)
    if not path.exists():
        return ok(f"no {path}: macnat attach {target.wifi} takes its settings from its command line", path=str(path))
    shown = ", ".join(f"{option.key} = {getattr(resolved.settings, option.attr)!r}" for option in config.OPTIONS
                      if resolved.sources[option.attr] != "default")
    return ok(f"{path}: {shown or 'defaults only'}", path=str(path), bridge=configured)


def _instance_problem(wifi: str) -> str | None:
    path = config.config_path(wifi)
    if not path.exists():
        return f"macnat@{wifi} is enabled but {path} does not exist: it stops at start with status 78 (no bridge)"
    try:
        values = config.read_file(path)
    except config.ConfigError as exc:
        return f"macnat@{wifi} is enabled but its settings are bad: {exc}"
    if not values.get("bridge"):
        return f"macnat@{wifi} is enabled but {path} sets no bridge: it stops at start with status 78"
    return None


@check(GROUP, "service", "macnat@.service", per_target=False)
def service(ctx):
    unit, enabled = unit_file(ctx), enabled_instances(ctx)
    if unit is None and not enabled:
        return ok(f"{UNIT} is not installed: macnat runs when started by hand (macnat attach WIFI BRIDGE)")
    names = ", ".join(f"macnat@{w}" for w in enabled) or "no instance"
    if unit is None:
        return error(f"{names} enabled, but no {UNIT} unit file in {', '.join(UNIT_DIRS)}",
                     "reinstall macnat's package (it ships /lib/systemd/system/macnat@.service), or: "
                     + "; ".join(f"systemctl disable macnat@{w}" for w in enabled), topics.SERVICE,
                     enabled=sorted(enabled))
    problems = {w: problem for w in enabled if (problem := _instance_problem(w))}
    if problems:
        return error("; ".join(problems.values()), "; ".join(f"macnat config write {w} vmbr0" for w in problems)
                     + "   # the bridge its VMs are on", topics.SERVICE, unit=str(unit), enabled=sorted(enabled))
    return ok(f"{unit}; enabled: {names}", unit=str(unit), enabled=sorted(enabled))


@check(GROUP, "attachment", "{wifi}: attachment", needs_root=True)
def attachment(ctx, target):
    found = ctx.attachment(target.wifi)
    start = f"macnat attach {target.wifi} {target.bridge or 'vmbr0'}   # or: systemctl enable --now macnat@{target.wifi}"
    if found is None:
        return warning(f"macnat is not attached to {target.wifi} (the access point checks that read its counters "
                       "wait for that)",
                       start, topics.NOT_ATTACHED, attached=False)
    d = found.describe()
    if target.bridge and d["bridge"] and d["bridge"] != target.bridge:
        return error(f"{target.wifi} is attached to {d['bridge']}, not {target.bridge}",
                     f"macnat detach {target.wifi} && macnat attach {target.wifi} {target.bridge}",
                     topics.ATTACHMENT, **d)
    manager = f"manager pid {d['manager_pid']}" if d["manager_pid"] else "no manager"
    state = f"{d['state']} ({manager}; uplink {d['uplink']}; programs {', '.join(sorted(d['programs']))})"
    if not d["complete"] or d["state"] != "attached":
        return error(f"incomplete: {state}", f"macnat detach {target.wifi}; {start}", topics.ATTACHMENT, **d)
    if not d["manager_pid"]:
        return warning(f"{state}: the datapath forwards, but nothing ages bindings or repairs the uplink",
                       f"{start}   # adopts the running datapath", topics.ATTACHMENT, **d)
    network = f" on {d['network']}" if d.get("network") else ""
    return ok(f"{state}{network}", **d)
