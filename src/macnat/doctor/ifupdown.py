"""/etc/network/interfaces as ifupdown2 reads it (its networkinterfaces.py): `iface` stanzas with their
options, through `source` includes (a glob, relative paths from /, where ifupdown2 runs). Enough to
know what `ifreload -a` does to a bridge's ports.

ifupdown2's bridge addon removes every port of a bridge that its `bridge-ports` does not list,
unless the port's name matches `bridge-ports-condone-regex` (re.match, so anchored at the start).
Debian's ifupdown2 has no default for that regex; Proxmox VE's sets `^(tap|veth|fwpr)`, and a value
the user sets replaces it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

INTERFACES = "/etc/network/interfaces"
PROXMOX_CONDONE_REGEX = "^(tap|veth|fwpr)"
KEYWORDS = ("source", "allow", "auto", "iface", "vlan")  # ifupdown2 matches the part before a "-"


@dataclass
class Stanza:
    name: str
    file: Path
    options: dict[str, list[str]] = field(default_factory=dict)   # option -> its values, in order

    def option(self, key: str) -> str | None:
        """The option's first value, as ifupdown2's get_attr_value_first() reads it."""
        values = self.options.get(key)
        return values[0] if values else None


def _logical_lines(text: str):
    """Lines without comments (only whole-line comments exist), backslash continuations joined."""
    for line in " ".join(part.strip() for part in text.split("\\")).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def parse(path: Path, root: Path = Path("/"), stanzas: dict[str, Stanza] | None = None,
          seen: set[Path] | None = None) -> dict[str, Stanza]:
    """Every `iface` stanza by name (inet and inet6 stanzas of one interface merged), from `path` and
    what it includes; include paths are taken under `root`."""
    stanzas = {} if stanzas is None else stanzas
    seen = set() if seen is None else seen
    if path in seen or not path.is_file():
        return stanzas
    seen.add(path)
    current: Stanza | None = None
    for line in _logical_lines(path.read_text(errors="replace")):
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword.split("-")[0] in KEYWORDS:
            current = None
            if keyword == "iface" and rest:
                name = rest.split()[0]
                current = stanzas.setdefault(name, Stanza(name, path))
            elif keyword.startswith("source") and rest:
                pattern = root / rest.split()[0].lstrip("/")
                for included in sorted(pattern.parent.glob(pattern.name)):
                    parse(included, root, stanzas, seen)
        elif current is not None:
            current.options.setdefault(keyword, []).append(rest)
    return stanzas


def listed(bridge_ports: str | None, port: str) -> bool:
    """Whether `bridge-ports` names the port: by name, or by ifupdown2's `regex PATTERN` form."""
    words = (bridge_ports or "").split()
    regexes = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "regex"]
    return port in words or any(re.match(pattern, port) for pattern in regexes)
