"""Shared fixtures. Every test runs for real: as root, with bcc and the lab tools (./setup.sh installs them).

A missing prerequisite fails the run; nothing is skipped.
"""

import os
import shutil

import pytest

from macnat import lab

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
