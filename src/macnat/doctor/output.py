"""doctor's findings for people: one line per check, the fix and the documentation entry below
anything that is not ok, grouped as the checks are, and a summary with the exit status."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from macnat.doctor import GROUPS, Report
from macnat.doctor.core import ERROR, OK, WARNING

STYLE = {OK: "green", WARNING: "yellow", ERROR: "bold red"}
INDENT = " " * 11
TITLE_WIDTH = 28


def print_report(report: Report, console: Console) -> None:
    def say(text: Text) -> None:
        console.print(text, soft_wrap=True)  # one line per finding, whatever its length: the terminal wraps it

    group = None
    for finding in report.findings:
        if finding.group != group:
            say(Text(("\n" if group else "") + GROUPS[finding.group], style="bold"))
            group = finding.group
        line = Text("  ")
        line.append(f"{finding.verdict:<9}", style=STYLE[finding.verdict])
        line.append(f"{finding.title:<{TITLE_WIDTH}} {finding.found}")
        say(line)
        if finding.verdict != OK:
            say(Text(f"{INDENT}fix: {finding.fix}"))
            if finding.doc:
                say(Text(f"{INDENT}see: {finding.doc}"))
    counts = {v: sum(1 for f in report.findings if f.verdict == v) for v in (ERROR, WARNING)}
    summary = ", ".join(f"{n} {v}{'s' if n != 1 else ''}" for v, n in counts.items() if n) or "no problems found"
    say(Text(f"\n{summary} (exit status {report.exit_status})", style=STYLE[report.worst]))
