"""macnat(8), written from the command tree itself, so that the page lists exactly the commands and
options the CLI has: `python3 -m macnat.manpage > macnat.8` (the Debian package does this when it is
built; tests/test_debian.py compares the installed page with the CLI).

The sections a command tree cannot give (the service, files, environment, exit status) are written
here, the environment from the settings' own table (macnat.config.OPTIONS).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import typer.main

from macnat import __version__, config
from macnat.cli import app

DESCRIPTION = """\
macnat puts the VMs of a Wi-Fi-only laptop on the Wi-Fi LAN as full hosts: their own addresses from
the LAN's DHCP server, reachable from every machine of the LAN. A Wi-Fi station cannot be a bridge
port and its access point drops frames from MACs it has not associated, so macnat translates MAC
addresses in the kernel: three TC eBPF programs between the Wi-Fi interface (WIFI, e.g. wlan0) and
the VMs' bridge (BRIDGE, e.g. vmbr0), and a manager that follows both.

The datapath keeps forwarding when its manager is gone; a new macnat attach adopts it with
everything it learned. macnat detach removes everything attaching created."""

SERVICE = """\
The template unit macnat@.service runs macnat attach WIFI --wait for the instance WIFI, with the
bridge and every other setting from /etc/macnat/WIFI.toml (macnat config write WIFI BRIDGE writes
it). It is started when the device WIFI appears once it is enabled
(systemctl enable --now macnat@wlan0), reports READY once the datapath forwards and STATUS lines
while it runs, and re-reads its settings file on systemctl reload. A bad settings file stops it with
exit status 78, which the unit does not restart on."""

FILES = (
    ("/etc/macnat/WIFI.toml", "The settings of WIFI: every key with its meaning and default."),
    ("/usr/share/doc/macnat/examples/wlan0.toml", "The same file, as macnat config write makes it."),
    ("/run/macnat/", "The lock and status file of every running manager."),
    ("/usr/share/macnat/hooks/", "Programs to use as network_change.hook, e.g. to relink Proxmox VE or libvirt VMs."),
    ("/usr/lib/NetworkManager/conf.d/macnat.conf", "Keeps NetworkManager off macnat's own links (vethmn*, mnpeer*)."),
)

EXIT_STATUS = (
    ("0", "Success."),
    ("1", "An error, explained on one line of standard error (macnat: error: ...)."),
    ("2", "A usage error: an unknown command or option, or a missing argument."),
    ("78", "A bad setting (EX_CONFIG), naming the file or variable and the key."),
)

EXTRA_ENVIRONMENT = (
    ("MACNAT_CONFIG_DIR", "Where the settings files are (default: /etc/macnat)."),
    ("MACNAT_NS_PREFIX", "Two letters that name the lab's network namespaces (default: mn)."),
)


def escape(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def commands(group=None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every command that runs something, with its path below `macnat` (('config', 'write'), ...)."""
    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if command.hidden:
            continue
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def synopsis(path: tuple[str, ...], command) -> str:
    words = [f"\\fB{escape(' '.join(('macnat', *path)))}\\fR"]
    if any(p.param_type_name == "option" for p in command.params):
        words.append("[\\fIOPTIONS\\fR]")
    for param in command.params:
        if param.param_type_name == "argument":
            name = f"\\fI{param.name.upper()}\\fR"
            words.append(name if param.required else f"[{name}]")
    return " ".join(words)


def command_section(path: tuple[str, ...], command) -> list[str]:
    lines = [f'.SS "{" ".join(path)}"', synopsis(path, command)]
    for text in paragraphs(command.help or ""):
        lines += [".PP", escape(text)]
    context = command.make_context(path[-1], [], resilient_parsing=True)
    for param in command.params:
        record = param.get_help_record(context)
        if record and param.param_type_name == "option":
            lines += [".TP", f"\\fB{escape(record[0])}\\fR", escape(" ".join(record[1].split()))]
    return lines


def definitions(items) -> list[str]:
    lines = []
    for term, meaning in items:
        lines += [".TP", f"\\fB{escape(term)}\\fR", escape(meaning)]
    return lines


def page() -> str:
    # SOURCE_DATE_EPOCH (set by dpkg-buildpackage from debian/changelog) keeps the build reproducible.
    built = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
    root = typer.main.get_command(app)
    lines = [
        f'.TH MACNAT 8 "{time.strftime("%Y-%m-%d", built)}" "macnat {__version__}" "System Administration"',
        ".SH NAME", "macnat \\- " + escape(root.help[0].lower() + root.help[1:].rstrip(".")),
        ".SH SYNOPSIS", "\\fBmacnat\\fR [\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
    ]
    for text in paragraphs(DESCRIPTION):
        lines += [".PP", escape(text)]
    lines.append(".SH COMMANDS")
    for path, command in commands():
        lines += command_section(path, command)
    lines.append(".SH SERVICE")
    for text in paragraphs(SERVICE):
        lines += [".PP", escape(text)]
    lines.append(".SH FILES")
    lines += definitions(FILES)
    lines += [".SH ENVIRONMENT", ".PP",
              "Each key of the settings file has a variable, which wins over the file and loses to the command line:"]
    lines += definitions([(option.env, f"{option.key}: {option.help}") for option in config.OPTIONS])
    lines += definitions(EXTRA_ENVIRONMENT)
    lines.append(".SH EXIT STATUS")
    lines += definitions(EXIT_STATUS)
    lines += [".SH SEE ALSO", "\\fBsystemctl\\fR(1), \\fBsystemd.service\\fR(5), \\fBtc\\fR(8), \\fBbpftool\\fR(8), "
              "\\fBNetworkManager.conf\\fR(5), /usr/share/doc/macnat/README.md"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
