"""Shared fixtures. Every test runs for real: as root, with bcc and the lab tools (./setup.sh installs them).

A missing prerequisite fails the run; nothing is skipped.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from debroot import ENV

from macnat import lab

REPO = Path(__file__).resolve().parents[1]

REQUIRED_TOOLS = ("ip", "nft", "dnsmasq", "dhclient", "tcpdump", "ping", "iperf3", "bpftool")


def pytest_sessionstart(session):
    problems = []
    if os.geteuid() != 0:
        problems.append("the tests need root")
    problems += [f"{tool} is missing" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if problems:
        pytest.exit("; ".join(problems) + " -- run ./setup.sh test", returncode=3)


@pytest.fixture
def fresh_lab():
    """A lab built for this test alone, removed afterwards."""
    lab.up()
    yield lab
    lab.down()


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    """The .deb, built with dpkg-buildpackage from the checkout's files as they are (tracked or new, not
    ignored ones), once per run: tests/test_debian.py installs it in a Debian root, tests/test_hwsim.py
    in the booted guest."""
    source = tmp_path_factory.mktemp("deb") / "macnat"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    [built] = source.parent.glob("macnat_*_all.deb")
    return built
