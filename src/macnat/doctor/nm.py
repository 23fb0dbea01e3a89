"""Which devices NetworkManager's configuration claims, as NetworkManager.conf(5) describes it.

NetworkManager reads NetworkManager.conf, then the conf.d files of /usr/lib, /run and /etc in the
order of their names (a file in /etc replaces one of the same name in the others). Whether it
manages a device: the first [device*] section whose match-device matches and that sets `managed`
decides (it overrides everything else); otherwise [keyfile] unmanaged-devices can leave it alone;
otherwise udev decides (NetworkManager's own rules leave veth devices unmanaged).
"""

from __future__ import annotations

import configparser
import fnmatch
from dataclasses import dataclass
from pathlib import Path

CONF = "/etc/NetworkManager/NetworkManager.conf"
CONF_DIRS = ("/usr/lib/NetworkManager/conf.d", "/run/NetworkManager/conf.d", "/etc/NetworkManager/conf.d")
TRUE = ("1", "yes", "true", "on")


@dataclass(frozen=True)
class Device:
    name: str
    type: str      # NetworkManager's type names for what macnat makes: "veth", "bridge"
    driver: str


@dataclass(frozen=True)
class Claim:
    managed: bool
    where: str     # "FILE [section] key=value"


def config_files(root: Path) -> list[Path]:
    """NetworkManager's configuration files in the order it reads them."""
    files = [root / CONF.lstrip("/")]
    by_name: dict[str, Path] = {}
    for directory in CONF_DIRS:
        for path in sorted((root / directory.lstrip("/")).glob("*.conf")):
            by_name[path.name] = path  # later directories (/etc last) replace earlier ones
    return [f for f in files if f.is_file()] + [by_name[name] for name in sorted(by_name)]


def _read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str
    try:
        parser.read(path)
    except configparser.Error:
        pass  # NetworkManager ignores what it cannot parse, and so do we
    return parser


def _spec_matches(spec: str, device: Device) -> bool:
    kind, sep, value = spec.partition(":")
    if not sep:
        return spec == "*"
    if kind == "interface-name":
        if value.startswith("="):
            return device.name == value[1:]
        if value.startswith("~"):
            return fnmatch.fnmatch(device.name.lower(), value[1:].lower())
        return fnmatch.fnmatchcase(device.name, value)
    if kind == "type":
        return fnmatch.fnmatchcase(device.type, value)
    if kind == "driver":
        return fnmatch.fnmatchcase(device.driver, value)
    return False


def matches(spec_list: str, device: Device) -> bool:
    """A device list ("interface-name:veth*;except:type:bridge"): some positive spec matches (or there are
    only except: specs) and no except: spec does."""
    specs = [s.strip() for s in spec_list.replace(",", ";").split(";") if s.strip()]
    positive = [s for s in specs if not s.startswith("except:")]
    negative = [s.removeprefix("except:") for s in specs if s.startswith("except:")]
    if any(_spec_matches(s, device) for s in negative):
        return False
    return any(_spec_matches(s, device) for s in positive) if positive else bool(negative)


def claim(files: list[Path], device: Device) -> Claim | None:
    """What NetworkManager's configuration decides for the device; None when it says nothing."""
    parsed = [(path, _read(path)) for path in files]
    for path, parser in parsed:
        for section in parser.sections():
            values = parser[section]
            if section.startswith("device") and "managed" in values and matches(values.get("match-device", "*"), device):
                return Claim(values["managed"].strip().lower() in TRUE, f"{path} [{section}] managed={values['managed']}")
    for path, parser in reversed(parsed):  # the last file that sets it wins
        if parser.has_option("keyfile", "unmanaged-devices"):
            spec = parser["keyfile"]["unmanaged-devices"]
            return Claim(False, f"{path} [keyfile] unmanaged-devices={spec}") if matches(spec, device) else None
    return None
