#!/bin/bash
# macnat over the real Linux Wi-Fi stack (cfg80211, mac80211, WPA2 with hostapd and wpa_supplicant),
# with mac80211_hwsim radios, inside a throwaway VM, as root. Shared by the qemu runner
# (tests/hwsim/run-qemu.sh) and Vagrant (vagrant/Vagrantfile).
#
#   ns-ap:  hostapd on the AP radio, bridged into br-lan with dnsmasq (DHCPv4, RA, DHCPv6);
#           ns-lan, a LAN host, hangs off br-lan
#   the VM's own namespace is the laptop: the station radio with wpa_supplicant and dhclient,
#           vmbr0, and two "VMs": ns-vm1, ns-vm2 on veths in vmbr0, with isc dhclient
#
# MACNAT_PIP_ARGS: what `pip install` gets to install macnat (a wheelhouse, or a source tree).
# MACNAT_LOG_DIR: where logs go (default /tmp/hwsim-logs).
set -uo pipefail

LOG=${MACNAT_LOG_DIR:-/tmp/hwsim-logs}
PIP_ARGS=${MACNAT_PIP_ARGS:?set MACNAT_PIP_ARGS to what pip installs macnat from}
RUN=/tmp/hwsim-run
mkdir -p "$LOG" "$RUN"
AP_NET=192.168.78 AP_NET6=fd78::
LAN_HOST=$AP_NET.20 LAN_HOST6=${AP_NET6}20
VM_MACS=([1]=52:54:00:00:02:01 [2]=52:54:00:00:02:02)
SSID=macnat-hwsim PSK=correct-horse-battery-staple
passed=0 failed=0 manager_pid=

say() { printf '\n=== %s\n' "$*"; }
pass() { printf '  PASS %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf '  FAIL %s\n' "$*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@" >>"$LOG/checks.log" 2>&1; then pass "$what"; else fail "$what"; fi; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
wait_for() { # seconds, command...: true once the command succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.2; done
}
ping_ok() { in_ns "$1" ping -n -c 2 -i 0.3 -W 3 "$2" >/dev/null; }

dump_logs() {
    say "logs for debugging"
    for f in hostapd.log wpa_supplicant.log macnat.log dnsmasq.log dhclient.log checks.log; do
        [ -s "$LOG/$f" ] && { echo "--- $f (last 40 lines)"; tail -n 40 "$LOG/$f"; }
    done
    echo "--- captures on the medium (hwsim0), first 40 frames"
    tcpdump -nn -e -r "$LOG/medium.pcap" 2>/dev/null | head -n 40
    echo "--- captures on the AP's LAN side (br-lan), first 40 frames"
    tcpdump -nn -e -r "$LOG/lan.pcap" 2>/dev/null | head -n 40
}
finish() {
    [ -n "$manager_pid" ] && kill "$manager_pid" 2>/dev/null
    pkill -f "tcpdump -i" 2>/dev/null; sleep 0.5
    say "summary: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] || dump_logs
    echo "$passed passed, $failed failed"
}
trap finish EXIT

# dhclient-script of our own: address and route only (a VM's /etc may be read-only).
cat >"$RUN/dhclient-script" <<'EOF'
#!/bin/sh
case "$reason" in
  PREINIT) ip link set dev "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface"
    [ -n "$new_routers" ] && ip route replace default via "${new_routers%% *}" dev "$interface" ;;
  BOUND6|RENEW6|REBIND6|REBOOT6) ip -6 addr replace "$new_ip6_address/$new_ip6_prefixlen" dev "$interface" ;;
  TIMEOUT) exit 1 ;;
esac
exit 0
EOF
chmod +x "$RUN/dhclient-script"
printf 'timeout 20;\nretry 1;\ninitial-interval 1;\n' >"$RUN/dhclient.conf"
dhcp() { # namespace-or-"-", interface, [-6]: prints the leased address
    local ns=$1 ifc=$2 fam=${3:--4} tag="$1-$2${3:-}"
    local cmd=(dhclient "$fam" -1 -v -cf "$RUN/dhclient.conf" -sf "$RUN/dhclient-script"
               -pf "$RUN/dhclient-$tag.pid" -lf "$RUN/dhclient-$tag.leases" "$ifc")
    [ "$fam" = -6 ] && cmd+=(-D LL)
    if [ "$ns" = - ]; then "${cmd[@]}" >>"$LOG/dhclient.log" 2>&1; else in_ns "$ns" "${cmd[@]}" >>"$LOG/dhclient.log" 2>&1; fi || return 1
    local show=(ip -o "$fam" addr show dev "$ifc" scope global) want='.'
    [ "$fam" = -6 ] && want='/128$'  # DHCPv6 (IA_NA) addresses, not the SLAAC /64 ones
    if [ "$ns" = - ]; then "${show[@]}"; else in_ns "$ns" "${show[@]}"; fi |
        awk -v want="$want" '$4 ~ want {print $4}' | cut -d/ -f1 | tail -n 1
}

say "mac80211_hwsim with 2 radios"
modprobe mac80211_hwsim radios=2 || { fail "modprobe mac80211_hwsim"; exit 1; }
wait_for 10 test -e /sys/class/ieee80211/phy1
ap_phy=$(basename "$(readlink -f /sys/class/net/wlan0/phy80211)")
pass "radios: $(ls /sys/class/ieee80211 | tr '\n' ' ')(AP on $ap_phy, station wlan1)"
tcpdump -i hwsim0 -U -w "$LOG/medium.pcap" >/dev/null 2>&1 &

say "the access point: hostapd (WPA2-PSK) bridged into br-lan, dnsmasq, a LAN host"
for ns in ns-ap ns-lan ns-vm1 ns-vm2; do ip netns add $ns; in_ns $ns ip link set lo up; done
iw phy "$ap_phy" set netns name ns-ap
in_ns ns-ap ip link add br-lan type bridge
in_ns ns-ap ip link add lan0 type veth peer name eth0 netns ns-lan
in_ns ns-ap ip link set lan0 master br-lan up
in_ns ns-ap ip addr add $AP_NET.1/24 dev br-lan
in_ns ns-ap ip -6 addr add ${AP_NET6}1/64 dev br-lan nodad
in_ns ns-ap ip link set br-lan up
in_ns ns-lan ip addr add $LAN_HOST/24 dev eth0
in_ns ns-lan ip -6 addr add $LAN_HOST6/64 dev eth0 nodad
in_ns ns-lan ip link set eth0 up
in_ns ns-lan ip route add default via $AP_NET.1
cat >"$RUN/hostapd.conf" <<EOF
interface=wlan0
bridge=br-lan
driver=nl80211
ssid=$SSID
hw_mode=g
channel=1
wpa=2
wpa_passphrase=$PSK
wpa_key_mgmt=WPA-PSK
rsn_pairwise=CCMP
EOF
in_ns ns-ap hostapd -B -dd -t -f "$LOG/hostapd.log" -P "$RUN/hostapd.pid" "$RUN/hostapd.conf"
in_ns ns-ap tcpdump -i br-lan -U -w "$LOG/lan.pcap" >/dev/null 2>&1 &
in_ns ns-ap dnsmasq --conf-file=/dev/null --port=0 --interface=br-lan --bind-interfaces --no-ping \
    --dhcp-authoritative --dhcp-range=$AP_NET.100,$AP_NET.199,255.255.255.0,1h \
    --dhcp-option=option:router,$AP_NET.1 --enable-ra --dhcp-range=${AP_NET6}100,${AP_NET6}1ff,slaac,64,1h \
    --dhcp-leasefile="$RUN/dnsmasq.leases" --log-dhcp --log-facility="$LOG/dnsmasq.log" --pid-file="$RUN/dnsmasq.pid"

say "the laptop: the station radio with wpa_supplicant, vmbr0 and two VMs"
cat >"$RUN/wpa.conf" <<EOF
ctrl_interface=/run/wpa_supplicant
network={
    ssid="$SSID"
    psk="$PSK"
    key_mgmt=WPA-PSK
}
EOF
wpa_supplicant -B -i wlan1 -c "$RUN/wpa.conf" -dd -t -f "$LOG/wpa_supplicant.log" -P "$RUN/wpa.pid"
sta_mac=$(cat /sys/class/net/wlan1/address)
associated() { wpa_cli -i wlan1 status 2>/dev/null | grep -q '^wpa_state=COMPLETED'; }
check "station $sta_mac associated with WPA2 (wpa_state=COMPLETED)" wait_for 60 associated
laptop_ip=$(dhcp - wlan1)
check "the laptop's wlan1 leased $laptop_ip from the AP side" test -n "$laptop_ip"
ip link add vmbr0 type bridge
ip link set vmbr0 up
for i in 1 2; do
    ip link add tap10$i type veth peer name eth0 netns ns-vm$i
    in_ns ns-vm$i ip link set eth0 address "${VM_MACS[$i]}"
    ip link set tap10$i master vmbr0 up
done

say "1. the problem is real"
enslave=$(ip link set wlan1 master vmbr0 2>&1)
check "enslaving wlan1 fails: ${enslave:-(it did not fail)}" grep -q "Device does not allow enslaving to a bridge" <<<"$enslave"
python3 - "${VM_MACS[1]}" <<'EOF'
import socket, sys
vm = bytes.fromhex(sys.argv[1].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("wlan1", 0))
arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + vm + bytes([192, 168, 78, 251]) + bytes(6) + bytes([192, 168, 78, 20])
for _ in range(5):
    s.send(b"\xff" * 6 + vm + b"\x08\x06" + arp)
EOF
sleep 2
vm_frames_on_lan() { tcpdump -nn -e -r "$LOG/lan.pcap" 2>/dev/null | grep -ci "${VM_MACS[1]}"; }
check "frames with a VM's source MAC sent out wlan1 never reach the AP's LAN (0 seen)" test "$(vm_frames_on_lan)" = 0
check "hostapd reports the unassociated sender ${VM_MACS[1]}" \
    grep -qi "not associated STA ${VM_MACS[1]}" "$LOG/hostapd.log"
check "the real station stays associated" associated

say "2. macnat attach wlan1 vmbr0, installed the way a user installs it"
python3 -m venv /tmp/macnat-venv
# shellcheck disable=SC2086
/tmp/macnat-venv/bin/pip install -q --disable-pip-version-check $PIP_ARGS >>"$LOG/checks.log" 2>&1
check "pip install macnat into a fresh venv" test -x /tmp/macnat-venv/bin/macnat
macnat=/tmp/macnat-venv/bin/macnat
$macnat attach wlan1 vmbr0 >"$LOG/macnat.log" 2>&1 &
manager_pid=$!
check "macnat attached and managing (bcc compile inside the VM)" wait_for 120 grep -q managing "$LOG/macnat.log"
# The VMs boot now, with macnat in place, as they would under a macnat service: their first router
# solicitations and DHCP requests go through it.
for i in 1 2; do in_ns ns-vm$i ip link set eth0 up; done
vm1=$(dhcp ns-vm1 eth0) vm2=$(dhcp ns-vm2 eth0)
check "both VMs leased from the AP side's dnsmasq: vm1 $vm1, vm2 $vm2" \
    test -n "$vm1" -a -n "$vm2" -a "$vm1" != "$vm2"
check "ping vm1 -> LAN host" ping_ok ns-vm1 $LAN_HOST
check "ping LAN host -> vm2" ping_ok ns-lan "$vm2"
check "ping AP -> vm1" ping_ok ns-ap "$vm1"
check "ping laptop -> vm1" ping -n -c 2 -i 0.3 -W 3 "$vm1"
check "ping vm2 -> laptop" ping_ok ns-vm2 "$laptop_ip"
check "ping vm1 -> vm2" ping_ok ns-vm1 "$vm2"
in_ns ns-lan iperf3 -s -1 -D -B $LAN_HOST -I "$RUN/iperf.pid"
sleep 1
tcp=$(in_ns ns-vm1 iperf3 -c $LAN_HOST -t 3 -J 2>/dev/null | python3 -c \
      'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6, 1))' 2>/dev/null)
check "TCP transfer vm1 -> LAN host over the air: ${tcp:-failed} Mbit/s" test -n "$tcp"
neigh() { in_ns ns-lan ip neigh show "$1" | grep -q "lladdr $sta_mac"; }
check "the LAN host sees vm1 and vm2 at the station's MAC $sta_mac" neigh "$vm1"
check "  ... vm2 too" neigh "$vm2"
table=$($macnat table --json)
check "macnat table lists both VMs" python3 -c "
import json, sys; rows = {r['ip']: r['mac'] for r in json.loads(sys.argv[1])}
assert rows['$vm1'] == '${VM_MACS[1]}' and rows['$vm2'] == '${VM_MACS[2]}', rows" "$table"

say "3. IPv6: SLAAC from the AP side's advertisements, DHCPv6, ping6"
slaac() { in_ns ns-vm1 ip -6 addr show dev eth0 scope global | grep -v tentative | grep -q "${AP_NET6}.*/64"; }
check "vm1 configured a SLAAC address" wait_for 30 slaac
vm1_slaac=$(in_ns ns-vm1 ip -o -6 addr show dev eth0 scope global | awk '$4 ~ /\/64/ {print $4}' | cut -d/ -f1 | head -n1)
wait_for 10 sh -c "! ip netns exec ns-vm2 ip -6 addr show dev eth0 scope link | grep -q tentative"
vm2_dhcp6=$(dhcp ns-vm2 eth0 -6)
check "vm2 leased $vm2_dhcp6 by DHCPv6" test -n "$vm2_dhcp6"
check "ping6 LAN host -> vm1 ($vm1_slaac)" ping_ok ns-lan "$vm1_slaac"
check "ping6 vm2 -> LAN host" ping_ok ns-vm2 $LAN_HOST6
check "ping6 LAN host -> vm2 ($vm2_dhcp6)" ping_ok ns-lan "$vm2_dhcp6"

say "4. detach, and the station throughout"
kill "$manager_pid"
wait "$manager_pid"
status=$?
manager_pid=
check "SIGTERM: the manager detached (exit $status)" test "$status" = 0
check "nothing left on wlan1 (no filters, no clsact) and no uplink" sh -c \
    '[ -z "$(tc filter show dev wlan1 ingress)$(tc filter show dev wlan1 egress)" ] &&
     ! tc qdisc show dev wlan1 | grep -q clsact && ! ip -o link | grep -q " mn-"'
check "the station stayed associated throughout: one association in hostapd's log" \
    test "$(grep -c "AP-STA-CONNECTED $sta_mac" "$LOG/hostapd.log")" = 1
check "  ... and still COMPLETED" associated
exit $((failed > 0))
