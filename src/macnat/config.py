"""Settings of one attachment: one TOML file per Wi-Fi interface, the environment, the command line.

Precedence: command line > environment (MACNAT_*) > /etc/macnat/<wifi>.toml > defaults. Every key is
declared once in OPTIONS below, with its type, default, check and meaning; the example file, the
environment names, `macnat config show` and the errors all come from that table.

A bad value is one line naming the file (or variable), the key and what is wrong, and exit status 78
(EX_CONFIG), which the service unit lists in RestartPreventExitStatus so a bad file does not make it
restart in a loop.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macnat.errors import MacnatError

EX_CONFIG = 78
CONFIG_DIR = Path(os.environ.get("MACNAT_CONFIG_DIR", "/etc/macnat"))
ENV_PREFIX = "MACNAT_"

LOG_FORMATS = ("text", "json")
DHCP_POLICIES = ("keep", "rewrite", "auto")
NETWORK_CHANGE_ACTIONS = ("bounce", "hook", "nothing")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class ConfigError(MacnatError):
    """A setting that cannot be used; exit status 78."""

    exit_code = EX_CONFIG


@dataclass(frozen=True)
class Settings:
    bridge: str | None = None
    age: float = 300.0
    wait: bool = False
    log_format: str = "text"
    dhcp: str = "keep"
    statics: dict[str, str] = field(default_factory=dict)
    network_change: str = "bounce"
    network_change_hook: str | None = None
    macs_per_port: int = 0          # 0: the datapath's default (constants.DEFAULT_*)
    ipv4_per_port: int = 0
    ipv6_per_port: int = 0
    allow_ipv4_link_local: bool = False
    allow_documentation: bool = False
    metrics_textfile: str | None = None
    metrics_listen: str | None = None
    verbose: bool = False

    def changes(self, other: Settings) -> dict[str, tuple[Any, Any]]:
        """Fields that differ: name -> (this value, the other's)."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}


# ---- checks: each returns the value to use, or raises ValueError with what is wrong -------------

def _positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, not {value!r}")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"must be a whole number from 0 (the default) to 65535, not {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _one_of(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}")
        return value
    return check


def _interface_name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) < 16 or "/" in value or value.strip() != value:
        raise ValueError(f"must be an interface name (1-15 characters), not {value!r}")
    return value


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {value!r}")
    return value or None


def _listen_address(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        valid = sep and 0 < int(port) < 65536
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"must be ADDRESS:PORT, e.g. 127.0.0.1:9877, not {value!r}")
    return text


def _statics(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a table of IP = MAC entries, not {value!r}")
    statics = {}
    for ip, mac in value.items():
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"'{ip}' is not an IPv4 or IPv6 address") from None
        if not isinstance(mac, str) or not MAC_RE.match(mac):
            raise ValueError(f"'{mac}' is not a MAC address like 52:54:00:12:34:56 (given for {ip})")
        statics[str(address)] = mac.lower()
    return statics


def parse_static_entries(entries: list[str]) -> dict[str, str]:
    """IP=MAC strings (the command line's --static, MACNAT_STATIC's comma-separated list) as a table."""
    table = {}
    for entry in entries:
        ip, sep, mac = entry.strip().partition("=")
        if not sep:
            raise ValueError(f"takes IP=MAC, got '{entry}'")
        table[ip.strip()] = mac.strip()
    return _statics(table)


@dataclass(frozen=True)
class Option:
    key: str                    # as written in the file: "age", "network_change.action"
    attr: str                   # the Settings field
    check: Callable[[Any], Any]
    help: str
    example: Any = None         # shown in the example file (defaults are shown when None)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    @property
    def default(self) -> Any:
        f = next(f for f in dataclasses.fields(Settings) if f.name == self.attr)
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


OPTIONS = (
    Option("bridge", "bridge", _interface_name, "the bridge the VMs are on", example="vmbr0"),
    Option("age", "age", _positive_seconds,
           "seconds a learned binding lives without traffic from its VM (idle ones are probed first)"),
    Option("wait", "wait", _boolean, "wait for the Wi-Fi interface when it does not exist (yet)"),
    Option("log_format", "log_format", _one_of(*LOG_FORMATS),
           "'text' lines, or 'json': one object per line for log shippers"),
    Option("dhcp", "dhcp", _one_of(*DHCP_POLICIES),
           "DHCPv4: 'keep' each VM's MAC as chaddr; 'rewrite' it to the Wi-Fi MAC, telling the VMs apart by their "
           "client identifier (option 61; for networks that check chaddr; a server that ignores option 61 gives "
           "every VM the same lease); 'auto': keep on each network until the VMs' requests go unanswered there "
           "while the server answers this host, then rewrite"),
    Option("static", "statics", _statics, "addresses bound to a VM MAC for good: never aged or taken over",
           example={"192.168.1.50": "52:54:00:12:34:56"}),
    Option("network_change.action", "network_change", _one_of(*NETWORK_CHANGE_ACTIONS),
           "on a new network: 'bounce' the VM ports' carrier (veth ports; the hook for others), "
           "'hook' only, or 'nothing'"),
    Option("network_change.hook", "network_change_hook", _text,
           "a program run on a new network, for the VM ports a carrier bounce cannot reach",
           example="/usr/share/macnat/hooks/proxmox-relink"),
    Option("limits.macs_per_port", "macs_per_port", _count, "MACs one VM port may use (0: the default, 32)"),
    Option("limits.ipv4_per_port", "ipv4_per_port", _count, "IPv4 addresses one VM port may use (0: the default, 64)"),
    Option("limits.ipv6_per_port", "ipv6_per_port", _count, "IPv6 addresses one VM port may use (0: the default, 128)"),
    Option("addresses.allow_ipv4_link_local", "allow_ipv4_link_local", _boolean,
           "VMs may use 169.254.0.0/16 (link-local IPv4) addresses"),
    Option("addresses.allow_documentation", "allow_documentation", _boolean,
           "VMs may use the documentation prefixes (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)"),
    Option("metrics.textfile", "metrics_textfile", _text,
           "write Prometheus metrics to this file (node_exporter's textfile collector)",
           example="/var/lib/prometheus/node-exporter/macnat-wlan0.prom"),
    Option("metrics.listen", "metrics_listen", _listen_address,
           "serve Prometheus metrics on this address", example="127.0.0.1:9877"),
)
BY_KEY = {o.key: o for o in OPTIONS}
BY_ATTR = {o.attr: o for o in OPTIONS}


def config_path(wifi: str) -> Path:
    return CONFIG_DIR / f"{wifi}.toml"


def _flatten(table: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"network_change": {"action": x}} -> {"network_change.action": x}; the static table stays whole."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name != "static":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_file(path: Path) -> dict[str, Any]:
    """The settings a file gives (attribute -> value); {} when there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values = {}
    for key, value in _flatten(table).items():
        option = BY_KEY.get(key)
        if option is None:
            known = ", ".join(o.key for o in OPTIONS)
            raise ConfigError(f"{path}: unknown key '{key}' (known keys: {known})")
        try:
            values[option.attr] = option.check(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {key} {exc}") from None
    return values


def _from_text(option: Option, text: str) -> Any:
    """An environment variable's text as the option's type."""
    if option.attr == "statics":
        return parse_static_entries([e for e in text.split(",") if e.strip()])
    default = option.default
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"must be true or false, not {text!r}")
        return lowered in ("1", "true", "yes")
    if isinstance(default, (int, float)):
        try:
            number = float(text) if isinstance(default, float) else int(text)
        except ValueError:
            raise ValueError(f"must be a number, not {text!r}") from None
        return option.check(number)
    return option.check(text)


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for option in OPTIONS:
        if option.env in environ:
            try:
                values[option.attr] = _from_text(option, environ[option.env])
            except ValueError as exc:
                raise ConfigError(f"environment: {option.env} {exc}") from None
    return values


def read_command_line(cli: Mapping[str, Any]) -> dict[str, Any]:
    """The command line's values, checked as the file's are (--static comes parsed already)."""
    values = dict(cli)
    for attr, value in cli.items():
        option = BY_ATTR.get(attr)
        if option is not None and attr != "statics":
            try:
                values[attr] = option.check(value)
            except ValueError as exc:
                raise ConfigError(f"command line: --{option.key.replace('_', '-')} {exc}") from None
    return values


@dataclass(frozen=True)
class Resolved:
    """Settings with where each value came from, and what is needed to resolve them again (reload)."""

    wifi: str
    settings: Settings
    sources: dict[str, str]          # attribute -> "default" | "<file path>" | "environment" | "command line"
    path: Path
    cli: dict[str, Any]


def resolve(wifi: str, cli: Mapping[str, Any], path: Path | None = None,
            environ: Mapping[str, str] | None = None) -> Resolved:
    """The effective settings for `wifi`; `cli` holds only what the command line set (attribute -> value)."""
    path = path or config_path(wifi)
    layers = (
        (str(path), read_file(path)),
        ("environment", read_environment(os.environ if environ is None else environ)),
        ("command line", read_command_line(cli)),
    )
    values: dict[str, Any] = {}
    sources = {f.name: "default" for f in dataclasses.fields(Settings)}
    for source, layer in layers:
        values.update(layer)
        sources.update({attr: source for attr in layer})
    return Resolved(wifi, Settings(**values), sources, path, dict(cli))


def reload(previous: Resolved) -> Resolved:
    """Read the file and the environment again; the command line's values still win."""
    return resolve(previous.wifi, previous.cli, previous.path)


def example(wifi: str, values: Mapping[str, Any] | None = None) -> str:
    """A commented config file for `wifi`: every key with its meaning; `values` (attribute -> value) set."""
    values = dict(values or {})
    lines = [f"# macnat settings for the Wi-Fi interface {wifi} (read by `macnat attach {wifi}` and the",
             f"# service macnat@{wifi}). Every key is optional but `bridge`; commented lines show defaults",
             "# or examples. The environment (MACNAT_<KEY>, e.g. MACNAT_AGE) and the command line win over this file.",
             ""]
    section = None
    for option in OPTIONS:
        head, _, name = option.key.rpartition(".")
        if option.attr == "statics":
            head, name = "static", None
        if head != (section or ""):
            lines += ["", f"[{head}]"]
            section = head
        lines.append(f"# {option.help}")
        if option.attr == "statics":
            entries = values.get("statics") or option.example
            prefix = "" if values.get("statics") else "# "
            lines += [f'{prefix}"{ip}" = "{mac}"' for ip, mac in entries.items()]
            continue
        shown = values.get(option.attr, option.example if option.example is not None else option.default)
        prefix = "" if option.attr in values else "# "
        lines.append(f"{prefix}{name} = {_toml_value(shown)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return '""'
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
