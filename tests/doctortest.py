"""Helpers for the doctor tests: run `macnat doctor --json` in the lab as a user runs it, and read its
findings. The system files doctor reads are seeded under a directory of the test's own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from macnat import lab
from macnat.lab import MACNAT
from macnat.plumbing import uplink_names

LAPTOP = lab.LAPTOP.ns
UPLINK = uplink_names(lab.LAPTOP.ifname)[0]
NO_NL80211 = {"wifi-station": "warning"}  # the lab's one standing finding


@pytest.fixture(autouse=True)
def system_root(tmp_path, monkeypatch) -> Path:
    """An empty stand-in for the machine's /etc and /lib, and for /etc/macnat."""
    root = tmp_path / "root"
    (root / "etc/macnat").mkdir(parents=True)
    monkeypatch.setenv("MACNAT_DOCTOR_ROOT", str(root))
    monkeypatch.setenv("MACNAT_CONFIG_DIR", str(root / "etc/macnat"))
    return root


def doctor(*args: str, prefix: tuple[str, ...] = ()) -> tuple[dict, int]:
    """`macnat doctor ARGS --json` in the laptop's namespace: the report and the exit status."""
    proc = subprocess.run([*prefix, *LAPTOP.exec_argv(MACNAT, "doctor", *args, "--json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 3, 4), proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit_status"] == proc.returncode
    return report, proc.returncode


def not_ok(report: dict) -> dict[str, str]:
    return {f["id"]: f["verdict"] for f in report["findings"] if f["verdict"] != "ok"}


def finding(report: dict, id: str) -> dict:
    (found,) = [f for f in report["findings"] if f["id"] == id]
    return found


def assert_only(report: dict, status: int, expected_status: int, **faults: str) -> None:
    """The report holds exactly these not-ok findings (beside the lab's nl80211 warning), each with its
    fix and a link into the troubleshooting guide."""
    assert not_ok(report) == {**NO_NL80211, **{k.replace("_", "-"): v for k, v in faults.items()}}, not_ok(report)
    assert status == expected_status
    for f in report["findings"]:
        if f["verdict"] != "ok":
            assert f["fix"] and f["doc"].startswith("docs/troubleshooting.md#"), f


