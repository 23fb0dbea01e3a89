"""`macnat doctor` on labs of their own: faults that need a lab from scratch (a machine where macnat never
ran, a second uplink, a manager killed, an access point with ARP offload) and the prerequisites (bcc
or headers hidden in a private mount namespace, bpf(2) hidden by seccomp, not root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from doctortest import LAPTOP, UPLINK, assert_only, doctor, finding, not_ok, system_root  # noqa: F401 (an autouse fixture)
from macnat import lab
from macnat.lab import MACNAT, RunningManager, ping
from test_attach import VM1, wait_for



def test_a_second_uplink_in_the_bridge(fresh_lab, tmp_path):
    # A veth from vmbr0 into the AP's bridge: what a wired NIC on the same LAN is. With macnat's uplink
    # that closes a loop, and broadcasts would circle at full speed: the AP forwards nothing from it or
    # from the station into it, so frames only come in (enough for the bridge to see the LAN there).
    manager = RunningManager(log=tmp_path / "manager.log")
    assert ping(LAPTOP, lab.ROUTER.ip)  # the host talks to its gateway, as a laptop does: macnat pins it ...
    assert lab.dhcp("vm1") and ping(VM1.ns, lab.ROUTER.ip)
    fdb = lambda: LAPTOP.run("bridge", "fdb", "show", "dev", UPLINK).stdout
    # ... to its uplink, once the host's neighbour entry for it says its MAC (an RTM_NEWNEIGH)
    assert wait_for(lambda: lab.ROUTER.mac in fdb(), timeout=10)
    lab.AP.run("nft", "add table bridge second; add chain bridge second forward { type filter hook forward priority -1; }; "
               'add rule bridge second forward iifname "p-second" drop; '
               'add rule bridge second forward iifname "air" oifname "p-second" drop')
    LAPTOP.ip("link", "add", "eth9", "type", "veth", "peer", "name", "p-second", "netns", lab.AP.name)
    try:
        lab.AP.ip("link", "set", "p-second", "master", "apbr", "up")
        LAPTOP.ip("link", "set", "eth9", "master", "vmbr0", "up")
        # The gateway's broadcast comes in on eth9: the bridge does not move the pinned (sticky) entry,
        # the datapath refuses the frame at the uplink, and the manager names the port it came from.
        def gateway_broadcasts_and_manager_names_eth9() -> bool:
            lab.ROUTER.ns.run("ping", "-b", "-c1", "-W1", "192.168.77.255", check=False)
            return f"frames from eth9 with source MAC {lab.ROUTER.mac}" in manager.text()
        assert wait_for(gateway_broadcasts_and_manager_names_eth9, timeout=15)
        assert wait_for(lambda: finding(doctor("wlan0", "vmbr0")[0], "bridge-uplink")["verdict"] == "error", timeout=10)
        report, status = doctor("wlan0", "vmbr0")
        uplink = finding(report, "bridge-uplink")
        assert (uplink["verdict"], status) == ("error", 4)
        assert uplink["details"]["uplinks"] == ["eth9"]
        assert f"the gateway {lab.ROUTER.ip} ({lab.ROUTER.mac}) came in on it" in uplink["found"]
        assert lab.ROUTER.mac in fdb()  # still pinned to the uplink: the VMs still reach the gateway through macnat
        assert uplink["fix"].startswith("ip link set eth9 nomaster")
    finally:
        LAPTOP.ip("link", "del", "eth9")
        manager.stop()


def test_a_machine_where_macnat_never_ran(fresh_lab):
    report, status = doctor()  # nothing attached, configured or enabled, and no Wi-Fi station to be seen
    assert status == 4 and not_ok(report) == {"targets": "error"}
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 3, attachment="warning")
    assert {"ap-group-unicast", "ap-arp-offload"}.isdisjoint(f["id"] for f in report["findings"])
    LAPTOP.ip("link", "set", "wlan0", "down")
    report, status = doctor("wlan0", "vmbr0")
    assert not_ok(report)["wifi-associated"] == "error" and status == 4
    assert finding(report, "wifi-associated")["found"] == "wlan0 is down"
    LAPTOP.ip("link", "set", "wlan0", "up")
    LAPTOP.ip("route", "replace", "default", "via", lab.GATEWAY)  # went with the link
    LAPTOP.ip("link", "add", "br9", "type", "bridge")
    LAPTOP.ip("link", "set", "wlan0", "master", "br9")  # the way one bridges a wired NIC
    try:
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 4, attachment="warning", wifi_bridged="error")
        assert finding(report, "wifi-bridged")["fix"].startswith("ip link set wlan0 nomaster")
    finally:
        LAPTOP.ip("link", "del", "br9")


def test_macnats_uplink_taken_out_of_the_bridge(fresh_lab, tmp_path):
    RunningManager(log=tmp_path / "manager.log").stop(signal.SIGKILL)  # nobody repairs what follows
    LAPTOP.ip("link", "set", UPLINK, "nomaster")
    report, status = doctor("wlan0", "vmbr0")
    assert_only(report, status, 4, attachment="warning", bridge_ports="error")
    assert finding(report, "bridge-ports")["fix"].startswith(f"ip link set {UPLINK} master vmbr0")
    assert finding(report, "attachment")["details"]["manager_pid"] is None
    subprocess.run(LAPTOP.exec_argv(MACNAT, "detach"), check=True, capture_output=True)


def test_an_access_point_whose_wifi_firmware_keeps_arp_from_the_host(tmp_path):
    lab.up(lab.Knobs(arp_offload=True))
    manager = RunningManager(log=tmp_path / "manager.log")
    try:
        assert lab.dhcp("vm1"), "DHCP needs no ARP"
        assert not ping(VM1.ns, lab.ROUTER.ip, timeout=1), "the gateway's ARP reply never reaches the VM"
        assert ping(lab.LANHOST.ns, lab.LAPTOP.ip), "ARP for the host's own address does"
        report, status = doctor("wlan0", "vmbr0")
        assert_only(report, status, 3, ap_arp_offload="warning")
        assert finding(report, "ap-arp-offload")["details"]["silent"] == [lab.vm_ip("vm1")]
    finally:
        manager.stop()
        lab.down()


@pytest.mark.parametrize("hidden, check, message", [
    ("/usr/lib/python3/dist-packages", "bcc", "bcc is missing: install Debian's python3-bpfcc"),
    (f"/lib/modules/{os.uname().release}", "kernel-headers", f"no kernel headers at /lib/modules/{os.uname().release}/build"),
], ids=["bcc", "headers"])
def test_missing_bcc_or_headers(fresh_lab, hidden, check, message):
    # A private mount namespace hides them from this one command, exactly as a machine without them.
    report, status = doctor("wlan0", "vmbr0", prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                      f'mount -t tmpfs none {hidden} && exec "$0" "$@"'))
    faults = {check: "error"} if check == "kernel-headers" else {"bcc": "error", "kernel-headers": "warning"}
    assert_only(report, status, 4, attachment="warning", **{k.replace("-", "_"): v for k, v in faults.items()})
    assert finding(report, check)["found"].startswith(message)


SECCOMP = ("import errno, os, sys, seccomp; f = seccomp.SyscallFilter(seccomp.ALLOW); "
           "f.add_rule(seccomp.ERRNO(errno.ENOSYS), 'bpf'); f.load(); os.execvp(sys.argv[1], sys.argv[1:])")


def test_a_kernel_without_the_bpf_syscall(fresh_lab):
    # A seccomp filter makes bpf(2) fail with ENOSYS, as on a kernel built without CONFIG_BPF_SYSCALL.
    report, status = doctor("wlan0", "vmbr0", prefix=("/usr/bin/python3", "-c", SECCOMP))
    assert_only(report, status, 4, attachment="warning", kernel_cls_bpf="error", kernel_test_run="warning",
                kernel_btf="warning", kernel_headers="error")
    assert finding(report, "kernel-cls-bpf")["found"] == \
        "bpf(BPF_PROG_LOAD) of a SCHED_CLS program: Function not implemented"
    assert finding(report, "kernel-clsact")["verdict"] == "ok"


def test_not_root(fresh_lab):
    proc = subprocess.run(LAPTOP.exec_argv("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                           MACNAT, "doctor", "wlan0", "vmbr0", "--json"),
                          capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout)
    assert proc.returncode == 4
    root = finding(report, "root")
    assert root["verdict"] == "error" and root["fix"] == "sudo macnat doctor"
    assert {"kernel-clsact", "attachment", "ap-proxy-arp"} <= set(root["details"]["skipped"])
    assert not {"kernel-clsact", "attachment"} & {f["id"] for f in report["findings"]}
