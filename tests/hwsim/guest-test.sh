#!/bin/bash
# macnat over the real Linux Wi-Fi stack (cfg80211, mac80211, WPA2 with hostapd and wpa_supplicant),
# with mac80211_hwsim radios, inside a throwaway VM, as root. Shared by the qemu runner
# (tests/hwsim/run-qemu.sh) and Vagrant (vagrant/Vagrantfile).
#
#   ns-ap:  hostapd on the AP radio, bridged into br-lan with dnsmasq (DHCPv4, RA, DHCPv6);
#           ns-lan, a LAN host, hangs off br-lan
#   ns-ap2: a second AP (another SSID, another subnet) with ns-lan2, for the laptop to roam to
#   the VM's own namespace is the laptop: the station radio with wpa_supplicant and dhclient,
#           vmbr0, and two "VMs": ns-vm1, ns-vm2 on veths in vmbr0, with isc dhclient, later dhcpcd
#
# MACNAT_PIP_ARGS: what `pip install` gets to install macnat (a wheelhouse, or a source tree).
# MACNAT_LOG_DIR: where logs go (default /tmp/hwsim-logs).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
manager_pid=

finish() {
    [ -n "$manager_pid" ] && kill "$manager_pid" 2>/dev/null
    summary hostapd.log hostapd2.log wpa_supplicant.log macnat.log dnsmasq.log dnsmasq2.log dhclient.log \
        dhcpcd-vm1.log dhcpcd-vm2.log
}
trap finish EXIT

say "mac80211_hwsim with 3 radios"
modprobe mac80211_hwsim radios=3 || { fail "modprobe mac80211_hwsim"; exit 1; }
wait_for 10 test -e /sys/class/ieee80211/phy2
ap_phy=$(phy_of wlan0) sta_phy=$(phy_of wlan1) ap2_phy=$(phy_of wlan2)
pass "radios: $(ls /sys/class/ieee80211 | tr '\n' ' ')(APs on $ap_phy and $ap2_phy, station wlan1 on $sta_phy)"
tcpdump -i hwsim0 -U -w "$LOG/medium.pcap" >/dev/null 2>&1 &

say "two access points: hostapd (WPA2-PSK) bridged into a LAN each, dnsmasq, a LAN host each"
start_ap "" "$ap_phy" wlan0 $AP_NET $AP_NET6 $SSID 1
start_ap 2 "$ap2_phy" wlan2 $AP2_NET $AP2_NET6 $SSID2 11

say "the laptop: the station radio with wpa_supplicant, vmbr0 and two VMs"
start_laptop

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
install_macnat
$macnat attach wlan1 vmbr0 >"$LOG/macnat.log" 2>&1 &
manager_pid=$!
check "macnat attached and managing (bcc compile inside the VM)" wait_for 120 grep -q "managing wlan1 <-> vmbr0" "$LOG/macnat.log"
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

check "the station stayed associated through all of it: one association in hostapd's log" \
    test "$(grep -c "AP-STA-CONNECTED $sta_mac" "$LOG/hostapd.log")" = 1
check "macnat status names the network: '$SSID'" sh -c "$macnat status | grep -q \"on '$SSID'\""

say "4. macnat doctor on the real stack (nl80211: station, network, 4-address mode)"
ap_mac=$(in_ns ns-ap cat /sys/class/net/wlan0/address)
$macnat doctor wlan1 vmbr0 --json >"$LOG/doctor.json" 2>>"$LOG/checks.log"
doctor_status=$?
python3 - "$LOG/doctor.json" <<'EOF' | tee -a "$LOG/checks.log"
import json, sys
for f in json.load(open(sys.argv[1]))["findings"]:
    print(f"  doctor: {f['verdict']:<8} {f['id']}: {f['found'][:150]}")
EOF
doctor_finding() { # id, python condition on the finding f (its details in d)
    python3 -c "
import json, sys
(f,) = [f for f in json.load(open('$LOG/doctor.json'))['findings'] if f['id'] == sys.argv[1]]
d = f['details']
assert $2, f" "$1"
}
check "doctor exits 0 or 3 (no error; exit $doctor_status)" test "$doctor_status" = 0 -o "$doctor_status" = 3
check "doctor: wlan1 is a Wi-Fi station" doctor_finding wifi-station "f['verdict'] == 'ok' and d['iftype'] == 'station'"
check "doctor: associated with SSID $SSID, BSSID $ap_mac, 2412 MHz" doctor_finding wifi-associated \
    "f['verdict'] == 'ok' and (d['ssid'], d['bssid'], d['frequency']) == ('$SSID', '$ap_mac', 2412)"
check "doctor: mac80211_hwsim allows 4-address mode on a station (probed)" doctor_finding wifi-4addr \
    "f['verdict'] == 'ok' and d['four_address'] == 'allowed'"
check "doctor: the probe left no interface behind" sh -c '! ip -o link | grep -q " mn4a"'
check "the manager names the network: wlan1 on '$SSID' ($ap_mac, 2412 MHz)" \
    grep -qF "wlan1 on '$SSID' ($ap_mac, 2412 MHz)" "$LOG/macnat.log"
check "  ... and the station stayed associated" associated


say "5. the laptop's day: the Wi-Fi flaps, is re-plugged, roams to another network with another MAC"
# From here on the VMs run dhcpcd, which asks for a lease again whenever its carrier comes back, as
# a guest's network manager does; its state stays private to each VM (a mount namespace of its own).
printf 'ipv4only\nnoipv4ll\noption subnet_mask, routers\n' >"$RUN/dhcpcd.conf"
for i in 1 2; do
    kill "$(cat "$RUN/dhclient-ns-vm$i-eth0.pid")" 2>/dev/null
    in_ns ns-vm$i ip -4 addr flush dev eth0
    in_ns ns-vm$i unshare --mount --propagation private sh -c "mount -t tmpfs none /run && \
        mount -t tmpfs none /var/lib/dhcpcd && exec dhcpcd -B -f $RUN/dhcpcd.conf -c /bin/true eth0" \
        >"$LOG/dhcpcd-vm$i.log" 2>&1 &
done
vm_addr() { in_ns "ns-vm$1" ip -o -4 addr show dev eth0 | awk -v net="$2." 'index($4, net) == 1 {print $4}' | cut -d/ -f1; }
check "both VMs leased again by dhcpcd" wait_for 30 sh -c "[ -n \"\$(ip netns exec ns-vm1 ip -4 -o addr show dev eth0)\" ] && [ -n \"\$(ip netns exec ns-vm2 ip -4 -o addr show dev eth0)\" ]"
vm1=$(vm_addr 1 $AP_NET)
laptop_dhcp() { # the laptop's own address on the network it is on now, as its network manager gets it
    laptop_ip=$(dhcp_again - wlan1)
}
reachable_after() { # seconds, namespace, address: prints how long until a ping got through
    local start=$SECONDS
    wait_for "$1" in_ns "$2" ping -n -c 1 -W 1 "$3" && echo $((SECONDS - start))
}

ip link set wlan1 down
sleep 1
ip link set wlan1 up
check "flap: wlan1 down and up, associated again" wait_for 60 associated
ip route replace default via $AP_NET.1 dev wlan1  # what the laptop's network manager restores
took=$(reachable_after 30 ns-lan "$vm1")
check "flap: the LAN host reaches vm1 again (${took:-never} s after the association)" test -n "$took"

kill "$(cat "$RUN/wpa.pid")"; kill "$(cat "$RUN/dhclient---wlan1.pid" 2>/dev/null)" 2>/dev/null; sleep 0.5
old_index=$(cat /sys/class/net/wlan1/ifindex)
iw dev wlan1 del
check "re-plug: macnat says wlan1 is gone" wait_for 10 grep -q "wlan1 is gone" "$LOG/macnat.log"
check "re-plug: macnat status says waiting for wlan1" sh -c "$macnat status | grep -q 'waiting for wlan1'"
iw phy "$sta_phy" interface add wlan1 type managed
wpa_supplicant -B -i wlan1 -c "$RUN/wpa.conf" -dd -t -f "$LOG/wpa_supplicant.log" -P "$RUN/wpa.pid"
check "re-plug: a new wlan1 (ifindex $(cat /sys/class/net/wlan1/ifindex), was $old_index), associated" wait_for 60 associated
laptop_dhcp
took=$(reachable_after 30 ns-lan "$vm1")
check "re-plug: the LAN host reaches vm1 again, its binding kept (${took:-never} s after the lease)" test -n "$took"
check "re-plug: macnat re-attached the programs it holds" grep -q "wlan1 is back (ifindex .*re-attached" "$LOG/macnat.log"

id=$(wpa_cli -i wlan1 add_network | tail -n 1)
for setting in "ssid \"$SSID2\"" "psk \"$PSK\"" "key_mgmt WPA-PSK" "mac_addr 1"; do
    # shellcheck disable=SC2086
    wpa_cli -i wlan1 set_network "$id" $setting >>"$LOG/checks.log"
done
wpa_cli -i wlan1 select_network "$id" >>"$LOG/checks.log"
on_ap2() { wpa_cli -i wlan1 status 2>/dev/null | grep -q "^ssid=$SSID2\$" && associated; }
check "roam: associated with $SSID2" wait_for 60 on_ap2
new_mac=$(cat /sys/class/net/wlan1/address)
check "roam: with a random MAC for that network ($new_mac, was $sta_mac)" test "$new_mac" != "$sta_mac"
laptop_dhcp
check "roam: the laptop leased $laptop_ip on the new network" sh -c "case '$laptop_ip' in $AP2_NET.*) ;; *) exit 1 ;; esac"
check "roam: nl80211 told macnat of the connection to '$SSID2'" wait_for 10 grep -q "wlan1 connected to '$SSID2'" "$LOG/macnat.log"
check "roam: macnat saw the new network" wait_for 15 grep -q "new network: '$SSID2' $AP2_NET.0/24" "$LOG/macnat.log"
check "roam: vm1 leased on the new network" wait_for 40 sh -c "[ -n \"\$(ip netns exec ns-vm1 ip -4 -o addr show dev eth0 | grep ' $AP2_NET\.')\" ]"
vm1=$(vm_addr 1 $AP2_NET)
took=$(reachable_after 30 ns-lan2 "$vm1")
check "roam: the new LAN's host reaches vm1 at $vm1 (${took:-never} s after vm1's lease)" test -n "$took"
check "roam: the new LAN sees vm1 at the station's new MAC" sh -c "ip netns exec ns-lan2 ip neigh show $vm1 | grep -q 'lladdr $new_mac'"
check "roam: vm1 reaches the new LAN's host" ping_ok ns-vm1 $LAN2_HOST

say "6. detach"
kill "$manager_pid"
wait "$manager_pid"
status=$?
manager_pid=
check "SIGTERM: the manager detached (exit $status)" test "$status" = 0
check "nothing left on wlan1 (no filters, no clsact) and no uplink" sh -c \
    '[ -z "$(tc filter show dev wlan1 ingress)$(tc filter show dev wlan1 egress)" ] &&
     ! tc qdisc show dev wlan1 | grep -q clsact && ! ip -o link | grep -qE " (vethmn|mnpeer)"'
check "  ... and the station still COMPLETED" associated
exit $((failed > 0))
