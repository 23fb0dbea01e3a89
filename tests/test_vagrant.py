"""The Vagrant path, really run: vagrant/Vagrantfile with the local box (tests/hwsim/build-box.sh) on
vagrant-libvirt, with a libvirtd of the runner's own in its own network namespace, under TCG here.
`vagrant up`, `vagrant provision` (the guest test, offline) and `vagrant destroy` must leave nothing
behind: no domain, network, volume or process, and the machine's own interfaces and firewall as
they were."""

import os
import subprocess
from pathlib import Path

from macnat.netns import PREFIX
from test_hwsim import EVIDENCE

RUNNER = Path(__file__).parent / "hwsim" / "run-vagrant.sh"
CACHE = Path(os.environ.get("MACNAT_HWSIM_CACHE", "/var/cache/macnat-hwsim"))


def root_namespace():
    """What libvirt's network would change: interfaces, nftables and iptables rules."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    rules = [subprocess.run(command, capture_output=True, text=True, check=True).stdout
             for command in (["nft", "list", "ruleset"], ["iptables-save"], ["ip6tables-save"])]
    return (sorted(line.split(":")[1].strip() for line in links.splitlines()),
            ["\n".join(l for l in r.splitlines() if not l.startswith("#")) for r in rules])


def test_vagrant_up_provision_destroy_with_the_local_box():
    before = root_namespace()
    proc = subprocess.run([str(RUNNER)], capture_output=True, text=True, timeout=3600)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, output[-20000:]
    for line in EVIDENCE:
        assert line in output, line
    for leftover in ("domain", "network", "volume", f"process in {PREFIX}libvirt"):
        assert f"PASS no {leftover} left" in output, leftover

    assert root_namespace() == before
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"{PREFIX}libvirt" not in namespaces
    assert not list(Path("/tmp").glob(f"macnat-vagrant-{PREFIX}.*"))
    # libvirtd and its qemu ran from the cache's Vagrant home: no process of theirs may remain.
    assert subprocess.run(["pgrep", "-f", str(CACHE / "vagrant.d")], capture_output=True).returncode == 1
