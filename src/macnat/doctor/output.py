"""doctor's findings for people: one line per check, the fix and the documentation entry below
anything that is not ok, grouped as the checks are, and a summary with the exit status."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from macnat.doctor import GROUPS, Report
from macnat.doctor.core import ERROR, OK, WARNING

STYLE = {OK: "green", WARNING: "yellow", ERROR: "bold red"}
INDENT = " " * 11
TITLE_WIDTH = 26


def print_report(report: Report, console: Console) -> None:
    group = None
    for finding in report.findings:
        if finding.group != group:
            group = finding.group
            console.print(Text(("\n" if finding is not report.findings[0] else "") + GROUPS[group], style="bold"))
        line = Text("  ")
        line.append(f"{finding.verdict:<9}", style=STYLE[finding.verdict])
        line.append(f"{finding.title:<{TITLE_WIDTH}} {finding.found}")
        console.print(line)
        if finding.verdict != OK:
            for i, fix in enumerate((finding.fix or "").splitlines()):
                console.print(Text(f"{INDENT}{'fix: ' if i == 0 else '     '}{fix}"))
            if finding.doc:
                console.print(Text(f"{INDENT}see: {finding.doc}"))
    counts = {v: sum(1 for f in report.findings if f.verdict == v) for v in (ERROR, WARNING)}
    summary = ", ".join(f"{n} {v}{'s' if n != 1 else ''}" for v, n in counts.items() if n) or "no problems found"
    console.print(Text(f"\n{summary} (exit status {report.exit_status})", style=STYLE[report.worst]))
