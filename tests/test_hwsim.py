"""macnat over real 802.11: mac80211_hwsim, hostapd (WPA2) and wpa_supplicant in a qemu VM running
Debian's kernel, through the laptop's day (a flap, a re-plug, a roam to another AP and subnet with a
per-network random MAC). The guest test prints every check; on failure it also prints the logs of hostapd,
wpa_supplicant, macnat and dnsmasq and a summary of the captures."""

import os
import subprocess
from pathlib import Path

RUNNER = Path(__file__).parent / "hwsim" / "run-qemu.sh"
EVIDENCE = (
    "PASS enslaving wlan1 fails: Error: Device does not allow enslaving to a bridge.",
    "PASS frames with a VM's source MAC sent out wlan1 never reach the AP's LAN (0 seen)",
    "PASS hostapd reports the unassociated sender",
    "PASS macnat attached and managing",
    "PASS both VMs leased from the AP side's dnsmasq",
    "PASS ping LAN host -> vm2",
    "PASS TCP transfer vm1 -> LAN host over the air",
    "PASS the LAN host sees vm1 and vm2 at the station's MAC",
    "PASS macnat table lists both VMs",
    "PASS ping6 LAN host -> vm1",
    "PASS vm2 leased",
    "PASS doctor: associated with SSID macnat-hwsim",
    "PASS the manager names the network: wlan1 on 'macnat-hwsim'",
    "PASS doctor: mac80211_hwsim allows 4-address mode on a station (probed)",
    "PASS the station stayed associated through all of it",
    "PASS macnat status names the network: 'macnat-hwsim'",
    "PASS flap: the LAN host reaches vm1 again",
    "PASS re-plug: macnat says wlan1 is gone",
    "PASS re-plug: macnat status says waiting for wlan1",
    "PASS re-plug: the LAN host reaches vm1 again, its binding kept",
    "PASS re-plug: macnat re-attached the programs it holds",
    "PASS roam: with a random MAC for that network",
    "PASS roam: nl80211 told macnat of the connection to 'macnat-hwsim-2'",
    "PASS roam: macnat saw the new network",
    "PASS roam: the new LAN's host reaches vm1",
    "PASS roam: the new LAN sees vm1 at the station's new MAC",
    "PASS nothing left on wlan1",
)

# Run as a unit by systemd as PID 1; its exit status must come back as the runner's.
SYSTEMD_SCRIPT = """
echo "PID 1: $(ps -p 1 -o comm=)"
echo "system: $(systemctl is-system-running --wait)"
systemd-run --wait --pipe --quiet echo "a transient unit ran"
modprobe mac80211_hwsim radios=1
timeout 30 sh -c 'until systemctl -q is-active sys-subsystem-net-devices-wlan0.device; do sleep 0.2; done'
echo "wlan0's device unit: $(systemctl is-active sys-subsystem-net-devices-wlan0.device)"
echo "pip installs macnat from: $MACNAT_PIP_ARGS"
exit 7
"""


def test_macnat_over_real_80211_in_a_vm():
    proc = subprocess.run([str(RUNNER)], capture_output=True, text=True, timeout=3600)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, output[-20000:]
    for line in EVIDENCE:
        assert line in output, line


def test_the_guest_runs_a_script_under_systemd(tmp_path):
    script = tmp_path / "systemd-check.sh"
    script.write_text(SYSTEMD_SCRIPT)
    env = os.environ | {"MACNAT_HWSIM_INIT": "systemd", "MACNAT_HWSIM_SCRIPT": str(script)}
    proc = subprocess.run([str(RUNNER)], capture_output=True, text=True, timeout=1800, env=env)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 7, output[-20000:]
    for line in ("PID 1: systemd", "system: running", "a transient unit ran", "wlan0's device unit: active",
                 "pip installs macnat from: --no-index --find-links /mnt/share/wheels macnat"):
        assert line in proc.stdout, line
