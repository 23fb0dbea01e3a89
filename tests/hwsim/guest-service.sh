#!/bin/bash
# macnat@wlan1 as a laptop runs it: systemd as PID 1 (tests/hwsim/run-qemu.sh, MACNAT_HWSIM_INIT=
# systemd), the Debian package, the unit enabled before the boot, and the Wi-Fi interface appearing
# only after the boot (its driver, mac80211_hwsim, loaded late, as a USB dongle or slow firmware does).
# Then READY, a reload, a kill -9, a package upgrade and a stop, with VMs pinging a LAN host over the
# real 802.11 stack throughout.
#
# The runner copies onto the guest's root, before the boot, what tests/test_hwsim.py prepared: the
# package's files (dpkg-deb -x of the .deb, standing for a package installed before this boot, which
# a throwaway root cannot keep), /etc/macnat/wlan1.toml, the unit's enablement, and the .deb itself
# in /root for apt.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
UNIT=macnat@wlan1.service
DEB=$(ls /root/macnat_*_all.deb)

unit() { systemctl show -P "$1" "$UNIT"; }
journal() { journalctl -b -u "$UNIT" --no-pager "$@"; }
loss_while() { # seconds of pinging vm1 -> LAN host, command...: prints the ping's loss in percent
    local seconds=$1; shift
    in_ns ns-vm1 ping -n -i 0.2 -W 1 -c $((seconds * 5)) "$LAN_HOST" >"$RUN/loss.log" 2>&1 &
    local pinger=$!
    sleep 1
    "$@" >>"$LOG/checks.log" 2>&1
    wait "$pinger"
    grep -o '[0-9.]*% packet loss' "$RUN/loss.log" | cut -d% -f1
}
nothing_left() {
    [ -z "$(tc filter show dev wlan1 ingress)$(tc filter show dev wlan1 egress)" ] &&
        ! tc qdisc show dev wlan1 | grep -q clsact && ! ip -o link | grep -qE " (vethmn|mnpeer)" &&
        [ -z "$(ls -A /run/macnat 2>/dev/null)" ] && ! bridge fdb show dev tap101 | grep -q static
}
trap 'summary journal.log hostapd.log wpa_supplicant.log dnsmasq.log dhclient.log' EXIT

say "the boot: macnat@wlan1 enabled, no Wi-Fi interface yet"
echo "  PID 1: $(ps -p 1 -o comm=), $(systemctl --version | head -n 1)"
system=$(systemctl is-system-running --wait)
check "the boot finished (system $system) without waiting for wlan1" test "$system" = running
check "$UNIT is enabled ($(systemctl is-enabled $UNIT))" test "$(systemctl is-enabled $UNIT)" = enabled
check "  ... and not started: wlan1 does not exist ($(unit ActiveState))" test "$(unit ActiveState)" = inactive
apt-get install -y -q --no-install-recommends "$DEB" >"$LOG/apt.log" 2>&1
check "apt installs the package over the files it had at boot (dpkg knows it now)" \
    sh -c "dpkg-query -W -f='\${Status}' macnat | grep -q 'install ok installed'"

say "wlan1 appears: mac80211_hwsim loaded after the boot"
modprobe mac80211_hwsim radios=2 || { fail "modprobe mac80211_hwsim"; exit 1; }
appeared=$SECONDS
wait_for 10 test -e /sys/class/net/wlan1
check "systemd starts $UNIT when wlan1's device appears" wait_for 30 sh -c "[ \"\$(systemctl show -P ActiveState $UNIT)\" != inactive ]"
# The status follows the bcc compile, which takes a minute or two under TCG (2 s on a laptop).
check "  ... not ready while there is no vmbr0: activating, STATUS 'waiting for vmbr0'" wait_for 240 sh -c \
    "[ \"\$(systemctl show -P ActiveState $UNIT)\" = activating ] && systemctl show -P StatusText $UNIT | grep -q 'waiting for vmbr0'"
tcpdump -i hwsim0 -U -w "$LOG/medium.pcap" >/dev/null 2>&1 &
start_ap "" "$(phy_of wlan0)" wlan0 $AP_NET $AP_NET6 $SSID 1
start_station
check "the station associated with WPA2" wait_for 60 associated
laptop_ip=$(dhcp - wlan1)
add_vms
wlan_up=$SECONDS  # vmbr0 exists from here
wait_for 240 sh -c "[ \"\$(systemctl show -P ActiveState $UNIT)\" = active ]"
check "READY once the datapath forwards: active, STATUS '$(unit StatusText)'" test "$(unit ActiveState)" = active
echo "  (wlan1's appearance to READY: $((SECONDS - appeared)) s, the AP's start and the association included; vmbr0 to READY: $((SECONDS - wlan_up)) s)"
for i in 1 2; do in_ns ns-vm$i ip link set eth0 up; done
vm1=$(dhcp ns-vm1 eth0) vm2=$(dhcp ns-vm2 eth0)
check "both VMs leased through the service: vm1 $vm1, vm2 $vm2" test -n "$vm1" -a -n "$vm2"
check "ping vm1 -> LAN host" ping_ok ns-vm1 $LAN_HOST
check "ping LAN host -> vm2" ping_ok ns-lan "$vm2"
wait_for 15 sh -c "systemctl show -P StatusText $UNIT | grep -q \"2 VMs, .* bindings on '$SSID'\""
check "STATUS says what it does: '$(unit StatusText)'" sh -c "systemctl show -P StatusText $UNIT | grep -q '^2 VMs'"
check "the journal has the manager's lines at their priorities (info: managing)" sh -c \
    "journalctl -b -u $UNIT -p info..info --no-pager | grep -q 'managing wlan1 <-> vmbr0'"

say "reload: a static binding and another ageing time, without a lost packet"
pid=$(unit MainPID)
static_ip=$AP_NET.250
loss=$(loss_while 6 sh -c "macnat config write wlan1 vmbr0 --force --age 120 --static $static_ip=${VM_MACS[2]} &&
                          systemctl reload $UNIT")
check "the reload lost ${loss:-?}% of vm1's pings" test "${loss:-x}" = 0
check "  ... same manager (pid $pid), active" test "$(unit MainPID):$(unit ActiveState)" = "$pid:active"
check "  ... which logged the change of age" sh -c "journalctl -b -u $UNIT --no-pager | grep -q 'age 300.0 -> 120.0'"
check "  ... and has the static binding $static_ip -> vm2" wait_for 10 sh -c \
    "macnat table --json | grep -q '\"$static_ip\"'"

say "kill -9: systemd restarts the manager, which adopts the running datapath"
loss=$(loss_while 15 systemctl kill -s KILL "$UNIT")
check "the unit was restarted (NRestarts $(unit NRestarts), pid $(unit MainPID), was $pid)" \
    test "$(unit NRestarts)" = 1 -a "$(unit MainPID)" != "$pid" -a "$(unit ActiveState)" = active
check "vm1 pinged the LAN host throughout: ${loss:-?}% lost" test "${loss:-x}" = 0
check "  ... the new manager adopted the running datapath (no compile)" sh -c \
    "journalctl -b -u $UNIT --no-pager | grep -q 'adopting the running datapath on wlan1'"
check "  ... with the bindings it had" sh -c "macnat table --json | grep -q '\"$vm1\"'"

say "an upgrade: the package's postinst restarts the running instance"
pid=$(unit MainPID) upgraded=$SECONDS
apt-get install -y -q --reinstall --no-install-recommends "$DEB" >>"$LOG/apt.log" 2>&1
check "after the upgrade a new manager runs (pid $(unit MainPID), was $pid), active" \
    wait_for 240 sh -c "[ \"\$(systemctl show -P ActiveState $UNIT)\" = active ] && [ \"\$(systemctl show -P MainPID $UNIT)\" != $pid ]"
echo "  (the upgrade, apt included, to the new manager's READY: $((SECONDS - upgraded)) s under TCG)"
check "  ... and vm1 reaches the LAN host" wait_for 30 ping_ok ns-vm1 $LAN_HOST

say "stop: detached, nothing left"
systemctl stop "$UNIT"
check "stopped cleanly ($(unit ActiveState), result $(unit Result))" test "$(unit ActiveState):$(unit Result)" = inactive:success
check "nothing left: no filters or clsact on wlan1, no uplink, no /run/macnat files, no VM FDB entries" nothing_left
check "  ... and the station still associated" associated
journal >"$LOG/journal.log" 2>&1
exit $((failed > 0))
