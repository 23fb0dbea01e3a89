#!/bin/bash
# What stricter access points do to macnat's VMs, on the real 802.11 stack (mac80211_hwsim, hostapd,
# wpa_supplicant) in a throwaway VM, as root; run by tests/hwsim/run-qemu.sh (MACNAT_HWSIM_SCRIPT).
#
#   ns-ap:  hostapd on the AP radio wlan0, bridged into br-lan with dnsmasq (DHCPv4, RA); ns-lan, a
#           LAN host, hangs off br-lan
#   the VM's own namespace is the laptop: the station wlan1, macnat, vmbr0 and two "VMs" ns-vm1, ns-vm2
#
# 1. A normal AP: mDNS (224.0.0.251 and ff02::fb, port 5353) both ways between the LAN host and vm1.
# 2. The same AP with hostapd's proxy ARP (proxy_arp=1, which needs ap_isolate=1): hostapd binds one
#    IPv4 address per station from the DHCP ACKs it snoops (chaddr must be an associated station) and
#    IPv6 addresses from the neighbour solicitations a station sends (its source link-layer address
#    must be the station's). The bridge answers ARP for bound addresses itself (proxyarp_wifi).
# 3. Proxy ARP with hostapd's disable_dgaf=1 (Hotspot 2.0's "no downstream group-addressed
#    forwarding"): every station gets its own random group key, so no broadcast or multicast from the
#    LAN reaches a station; only what the AP answers or turns into unicast itself gets through.
# For 2 and 3 and each DHCP policy (macnat attach --dhcp keep | rewrite) the script records, in a
# matrix, whether the LAN host reaches the laptop and each VM over IPv4 and IPv6, whether the address
# was bound by hostapd, and whether the LAN host's ARP request / neighbour solicitation reached the
# station at all; then again after the laptop and the VMs announce their addresses with a gratuitous
# ARP (hostapd's proxy ARP sets arp_accept on the bridge, whose neighbour table its bridge port answers
# ARP from). What macnat promises is checked; what the AP makes impossible is recorded (NOTE).
#
# MACNAT_PIP_ARGS: what `pip install` gets to install macnat. MACNAT_LOG_DIR: where logs go.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/guest-lib.sh"
manager_pid=
MATRIX=$LOG/matrix.tsv
# Every client sends a client identifier (option 61), as NetworkManager and systemd-networkd do. The
# host's own lease must have one: dnsmasq gives a request whose client identifier matches no lease any
# lease of its chaddr that has none, so under dhcp = rewrite (chaddr the station's) every VM was offered
# the host's address (measured: isc dhclient's default, no identifier), an offer macnat drops.
echo 'send dhcp-client-identifier = hardware;' >>"$RUN/dhclient.conf"

finish() {
    [ -n "$manager_pid" ] && kill "$manager_pid" 2>/dev/null
    summary hostapd.log wpa_supplicant.log macnat.log dnsmasq.log dhclient.log
}
trap finish EXIT
note() { # what, command...: its outcome printed, not counted (what the access point makes impossible)
    local what=$1; shift
    if "$@" >>"$LOG/checks.log" 2>&1; then printf '  NOTE %s: yes\n' "$what"; else printf '  NOTE %s: no\n' "$what"; fi
}

# Datagrams to a multicast group, as mDNS responders and browsers send them: `mcast listen GROUP PORT
# IFNAME SECONDS` prints what arrives (after "joined"), `mcast send GROUP PORT IFNAME TEXT` sends 5.
cat >"$RUN/mcast.py" <<'EOF'
import socket, struct, sys, time
role, group, port, ifname = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
index = socket.if_nametoindex(ifname)
if ":" in group:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    target = (group, port, 0, index)
    join = (socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, socket.inet_pton(socket.AF_INET6, group) + struct.pack("=I", index))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = (group, port)
    join = (socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("=4s4si", socket.inet_aton(group), bytes(4), index))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
if role == "listen":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.setsockopt(*join)
    print("joined", flush=True)
    s.settimeout(float(sys.argv[5]))
    try:
        while True:
            data, sender = s.recvfrom(2048)
            print(data.decode(errors="replace"), "from", sender[0], flush=True)
    except socket.timeout:
        pass
else:
    for _ in range(5):
        s.sendto(sys.argv[5].encode(), target)
        time.sleep(0.2)
EOF
mdns_heard() { # receiver namespace, sender namespace, group: the sender's datagrams reach the receiver
    local to=$1 from=$2 group=$3 text="mdns-$1-from-$2-$3" out="$RUN/mcast-$1-$3.log"
    in_ns "$to" python3 "$RUN/mcast.py" listen "$group" 5353 eth0 3 >"$out" 2>&1 &
    local listener=$!
    wait_for 10 grep -q joined "$out"
    sleep 0.5  # the join's IGMP/MLD report
    in_ns "$from" python3 "$RUN/mcast.py" send "$group" 5353 eth0 "$text" >>"$LOG/checks.log" 2>&1
    wait "$listener"
    cat "$out" >>"$LOG/checks.log"
    grep -q "^$text from" "$out"
}

say "mac80211_hwsim with 2 radios, a normal access point, the laptop with two VMs"
modprobe mac80211_hwsim radios=2 || { fail "modprobe mac80211_hwsim"; exit 1; }
wait_for 10 test -e /sys/class/ieee80211/phy1
ap_phy=$(phy_of wlan0)
tcpdump -i hwsim0 -U -w "$LOG/medium.pcap" >/dev/null 2>&1 &
start_ap "" "$ap_phy" wlan0 $AP_NET $AP_NET6 $SSID 1
start_laptop
install_macnat

start_macnat() { # DHCP policy: a manager on wlan1 <-> vmbr0 with it, the VMs leasing through it afresh
    local policy=$1 i
    : >"$LOG/macnat.log"
    $macnat attach wlan1 vmbr0 --dhcp "$policy" >>"$LOG/macnat.log" 2>&1 &
    manager_pid=$!
    check "macnat attach --dhcp $policy: managing" wait_for 120 grep -q "managing wlan1 <-> vmbr0" "$LOG/macnat.log"
    for i in 1 2; do in_ns "ns-vm$i" ip link set eth0 up; done
    vm_ip[1]=$(dhcp_again ns-vm1 eth0) vm_ip[2]=$(dhcp_again ns-vm2 eth0)
}
stop_macnat() {
    kill "$manager_pid"; wait "$manager_pid"; manager_pid=
}
global6() { # namespace-or-"-", interface: the SLAAC address from the AP side's advertisements
    local show=(ip -o -6 addr show dev "$2" scope global)
    if [ "$1" = - ]; then "${show[@]}"; else in_ns "$1" "${show[@]}"; fi |
        awk -v net="$AP_NET6" 'index($4, net) == 1 && $4 ~ /\/64$/ && !/tentative/ {print $4}' | cut -d/ -f1 | head -n 1
}

start_macnat keep
check "both VMs leased: vm1 ${vm_ip[1]}, vm2 ${vm_ip[2]}" test -n "${vm_ip[1]}" -a -n "${vm_ip[2]}"
check "vm1 configured a SLAAC address" wait_for 30 sh -c "[ -n \"\$(ip netns exec ns-vm1 ip -6 addr show dev eth0 scope global | grep '/64' | grep -v tentative)\" ]"
check "the laptop configured a SLAAC address" wait_for 30 sh -c "[ -n \"\$(ip -6 addr show dev wlan1 scope global | grep '/64' | grep -v tentative)\" ]"

say "1. discovery multicast on a normal AP: mDNS between the LAN host and vm1, both ways"
check "mDNS 224.0.0.251: LAN host -> vm1" mdns_heard ns-vm1 ns-lan 224.0.0.251
check "mDNS 224.0.0.251: vm1 -> LAN host" mdns_heard ns-lan ns-vm1 224.0.0.251
check "mDNS ff02::fb: LAN host -> vm1" mdns_heard ns-vm1 ns-lan ff02::fb
check "mDNS ff02::fb: vm1 -> LAN host" mdns_heard ns-lan ns-vm1 ff02::fb
check "the LAN host heard vm1's mDNS from vm1's own address ${vm_ip[1]}" \
    grep -q "^mdns-ns-lan-from-ns-vm1-224.0.0.251 from ${vm_ip[1]}$" "$RUN/mcast-ns-lan-224.0.0.251.log"
stop_macnat

# What the station receives (before macnat's programs: a packet socket sees it first), to tell the
# LAN host's requests that reached the air from those the AP answered or swallowed.
tcpdump -i wlan1 --immediate-mode -U -n -w "$LOG/station.pcap" arp or icmp6 or udp port 67 or udp port 68 >/dev/null 2>&1 &
requests_seen() { # family, address: how many ARP requests from the LAN host / multicast NS (not DAD's) for
    # it reached the station (the LAN host solicits from its SLAAC address, not from $LAN_HOST6)
    tcpdump -n -r "$LOG/station.pcap" 2>/dev/null | awk -v fam="$1" -v ip="$2" -v lan="$LAN_HOST" '
        fam == 4 && index($0, "Request who-has " ip " tell " lan ",") { n++ }
        fam == 6 && index($0, " > ff02::1:ff") && !index($0, " :: > ") && index($0, "neighbor solicitation, who has " ip ",") { n++ }
        END { print n + 0 }'
}
bound() { # family, address: hostapd's entry for it in br-lan's neighbour table (the dynamic ones flushed)
    [ -n "$(in_ns ns-ap ip "-$1" neigh show dev br-lan to "$2" nud permanent)" ]
}
probe() { # AP mode, policy, family, host name, address, [keep]: one row of the matrix; the AP's own
    # neighbour entries are flushed first (they are its router's, here) unless "keep" is given
    local mode=$1 policy=$2 fam=$3 host=$4 addr=$5 ap_cache=${6:-flush} is_bound=no reachable=no before after how
    if [ -z "$addr" ]; then
        printf '%s\t%s\tIPv%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$policy" "$fam" "$host" "(none)" - no "no address" >>"$MATRIX"
        return
    fi
    in_ns ns-lan ip "-$fam" neigh flush dev eth0
    [ "$ap_cache" = keep ] || in_ns ns-ap ip "-$fam" neigh flush dev br-lan  # hostapd's entries are permanent
    bound "$fam" "$addr" && is_bound=yes
    before=$(requests_seen "$fam" "$addr")
    in_ns ns-lan ping -n -c 2 -i 0.3 -W 2 "$addr" >/dev/null 2>&1 && reachable=yes
    sleep 1
    after=$(requests_seen "$fam" "$addr")
    if [ "$after" -gt "$before" ] && [ "$reachable" = yes ]; then how="its owner answered: the request reached the station ($((after - before))x)"
    elif [ "$after" -gt "$before" ]; then how="the request reached the station ($((after - before))x), no answer came back"
    elif [ "$reachable" = yes ]; then how="the AP answered: the request never reached the station"
    else how="the request never reached the station"; fi
    printf '%s\t%s\tIPv%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$policy" "$fam" "$host" "$addr" "$is_bound" "$reachable" "$how" >>"$MATRIX"
    printf '  %-10s %-7s IPv%s %-6s %-24s bound %-3s reachable %-3s %s\n' "$mode" "$policy" "$fam" "$host" "$addr" "$is_bound" "$reachable" "$how"
}
cell() { # AP mode, policy, family, host: the reachable column of that row
    awk -F'\t' -v m="$1" -v p="$2" -v f="IPv$3" -v h="$4" '$1 == m && $2 == p && $3 == f && $4 == h {print $7}' "$MATRIX"
}

strict_ap() { # mode name, hostapd.conf lines: hostapd restarted with them, the station back, the laptop leased
    local mode=$1 extra=$2
    say "$mode: hostapd with $(tr '\n' ' ' <<<"$extra")"
    stop_hostapd ""
    start_hostapd "" wlan0 $SSID 1 "$extra"
    check "$mode: the station associated again" wait_for 60 associated
    check "$mode: hostapd set proxyarp_wifi and hairpin_mode on its bridge port, arp_accept on br-lan" in_ns ns-ap sh -c \
        '[ "$(cat /sys/class/net/wlan0/brport/proxyarp_wifi)$(cat /sys/class/net/wlan0/brport/hairpin_mode)$(cat /proc/sys/net/ipv4/conf/br-lan/arp_accept)" = 111 ]'
    check "$mode: no x_snoop or dhcp_snoop failure in hostapd's log" sh -c "! grep -E 'x_snoop: |snooping infrastructure initialization failed' '$LOG/hostapd.log'"
    echo "  bridge port: $(in_ns ns-ap bridge -d link show dev wlan0 | tr -s ' \n' ' ' | grep -oE 'hairpin \S+|proxy_arp_wifi \S+|neigh_suppress \S+|mcast_to_unicast \S+' | tr '\n' ' ')"
    laptop_ip=$(dhcp_again - wlan1)
    check "$mode: hostapd bound the laptop's own lease $laptop_ip to the station (DHCP snooping is on)" wait_for 5 \
        grep -q "dhcp_snoop: Found DHCPACK for $sta_mac @ IPv4 address $laptop_ip/" "$LOG/hostapd.log"
}

measure() { # AP mode, policy: macnat with that policy, the VMs lease and talk, then the LAN host probes
    local mode=$1 policy=$2 i fam promise=check promise6=check
    # Without group frames (no-dgaf) the VMs' leases and IPv6 are recorded, not promised: hostapd turns
    # DHCP answers into unicast to the station (but not an ACK for a chaddr that is no station's), which
    # the VMs did not take (measured, see the lead's notes), and neighbour solicitations from the LAN
    # stay multicast, which no station can decrypt.
    [ "$mode" = no-dgaf ] && promise=note promise6=note
    start_macnat "$policy"
    $promise "$mode, $policy: vm1 leased ${vm_ip[1]:-nothing}" test -n "${vm_ip[1]}"
    $promise "$mode, $policy: vm2 leased ${vm_ip[2]:-nothing}" test -n "${vm_ip[2]}"
    for i in 1 2; do
        vm6[$i]=$(global6 "ns-vm$i" eth0)
        in_ns "ns-vm$i" ip neigh flush dev eth0
        # A VM that talks: its ARP and neighbour solicitations (from its global address, which hostapd
        # learns IPv6 addresses from) go out before the LAN host tries to reach it.
        $promise "$mode, $policy: vm$i reaches the LAN host (IPv4)" ping_ok "ns-vm$i" $LAN_HOST
        $promise6 "$mode, $policy: vm$i reaches the LAN host (IPv6, from ${vm6[$i]:-no address})" \
            in_ns "ns-vm$i" ping -n -c 2 -i 0.3 -W 3 -I "${vm6[$i]:-::}" $LAN_HOST6
    done
    laptop6=$(global6 - wlan1)
    ip -6 neigh flush dev wlan1
    ping -n -c 1 -W 2 -I "$laptop6" $LAN_HOST6 >/dev/null 2>&1
    {
        echo "--- $mode, $policy: br-lan's neighbour table (hostapd's entries are the permanent ones)"
        in_ns ns-ap ip neigh show dev br-lan
    } >>"$LOG/checks.log"
    for fam in 4 6; do
        if [ $fam = 4 ]; then
            probe "$mode" "$policy" 4 laptop "$laptop_ip"; probe "$mode" "$policy" 4 vm1 "${vm_ip[1]}"; probe "$mode" "$policy" 4 vm2 "${vm_ip[2]}"
        else
            probe "$mode" "$policy" 6 laptop "$laptop6"; probe "$mode" "$policy" 6 vm1 "${vm6[1]}"; probe "$mode" "$policy" 6 vm2 "${vm6[2]}"
        fi
    done
}
garp() { # namespace-or-"-", interface, MAC, IPv4 address: a gratuitous ARP announcing it (RFC 5227 2.3)
    local send=(/tmp/macnat-venv/bin/python -c 'import socket, sys; from macnat import frames
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((sys.argv[1], 0))
s.send(frames.gratuitous_arp(bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])))' "$2" "$3" "$4")
    [ -n "$4" ] || return 0
    if [ "$1" = - ]; then "${send[@]}"; else in_ns "$1" "${send[@]}"; fi
}
announce_and_probe() { # AP mode, policy: the laptop and the VMs send a gratuitous ARP, the LAN host probes again
    local i
    garp - wlan1 "$sta_mac" "$laptop_ip"
    for i in 1 2; do garp "ns-vm$i" eth0 "${VM_MACS[$i]}" "${vm_ip[$i]}"; done
    sleep 1
    probe "$1" "$2+garp" 4 laptop "$laptop_ip" keep; probe "$1" "$2+garp" 4 vm1 "${vm_ip[1]}" keep; probe "$1" "$2+garp" 4 vm2 "${vm_ip[2]}" keep
}

for mode in proxy-arp no-dgaf; do
    case $mode in
        proxy-arp) extra=$'proxy_arp=1\nap_isolate=1' ;;
        no-dgaf) extra=$'proxy_arp=1\nap_isolate=1\ndisable_dgaf=1' ;;
    esac
    strict_ap "$mode" "$extra"
    if [ "$mode" = no-dgaf ]; then
        # hostapd re-sends a DHCP answer it turns into unicast as it captured it on br-lan. dnsmasq's,
        # made on this same machine, carries only the pseudo-header sum there (checksum offload), and
        # the VMs' DHCP client dropped it (measured: "bad udp cksum 0x0fef"); a server elsewhere on the
        # LAN sends full sums. So br-lan computes them itself (ETHTOOL_STXCSUM off; no ethtool here).
        check "$mode: br-lan's checksum offload off, so that dnsmasq's answers carry full checksums" in_ns ns-ap python3 -c '
import ctypes, fcntl, socket, struct
value = ctypes.create_string_buffer(struct.pack("II", 0x17, 0))  # struct ethtool_value: ETHTOOL_STXCSUM, off
fcntl.ioctl(socket.socket(), 0x8946, struct.pack("16sQ16x", b"br-lan", ctypes.addressof(value)))  # SIOCETHTOOL'
    fi
    [ "$mode" = no-dgaf ] && { in_ns ns-vm1 tcpdump -i eth0 --immediate-mode -U -n -w "$LOG/vm1-dhcp.pcap" udp port 67 or udp port 68 >/dev/null 2>&1 & }
    for policy in keep rewrite; do
        say "$mode AP, dhcp = $policy: what the LAN host reaches"
        measure "$mode" "$policy"
        if [ "$policy" = rewrite ]; then
            last=$(grep -o "dhcp_snoop: Found DHCPACK for $sta_mac @ IPv4 address [0-9.]*" "$LOG/hostapd.log" | tail -n 1 | awk '{print $NF}')
            check "$mode, rewrite: hostapd bound a VM's lease ($last) to the station instead of the laptop's $laptop_ip" \
                test -n "$last" -a "$last" != "$laptop_ip"
        fi
        if [ "$mode" = no-dgaf ]; then
            echo "  DHCP replies that reached vm1's eth0: $(tcpdump -n -r "$LOG/vm1-dhcp.pcap" 'udp src port 67' 2>/dev/null | wc -l)," \
                "with a bad UDP checksum: $(tcpdump -n -vv -r "$LOG/vm1-dhcp.pcap" 'udp src port 67' 2>/dev/null | grep -c 'bad udp cksum')"
            echo "  macnat stats: $($macnat stats 2>&1 | grep -iE 'dhcp|group' | tr -s ' \n' ' ')"
        fi
        # On a plain proxy-ARP AP the LAN's broadcasts still reach the station: nothing may get worse.
        if [ "$mode" = proxy-arp ]; then
            for host in laptop vm1 vm2; do
                check "$mode, $policy: the LAN host reaches $host over IPv4" test "$(cell "$mode" "$policy" 4 $host)" = yes
                check "$mode, $policy: the LAN host reaches $host over IPv6" test "$(cell "$mode" "$policy" 6 $host)" = yes
            done
        fi
        announce_and_probe "$mode" "$policy"
        # Whatever hostapd bound, its bridge answers for, and macnat must deliver.
        check "$mode, $policy: every IPv4 address hostapd bound is reachable (its bridge answers ARP for it)" \
            awk -F'\t' -v m="$mode" -v p="$policy" '$1 == m && $2 == p && $3 == "IPv4" && $6 == "yes" && $7 != "yes" {bad = 1}
                END {exit bad}' "$MATRIX"
        stop_macnat
    done
done

say "the matrix: AP x DHCP policy x family x host -> reachable from the LAN host"
printf 'MATRIX %-10s %-8s %-6s %-7s %-24s %-6s %-10s %s\n' AP policy family host address bound reachable why
while IFS=$'\t' read -r mode policy fam host addr is_bound reachable how; do
    printf 'MATRIX %-10s %-8s %-6s %-7s %-24s %-6s %-10s %s\n' "$mode" "$policy" "$fam" "$host" "$addr" "$is_bound" "$reachable" "$how"
done <"$MATRIX"
check "the matrix has all 36 rows" test "$(wc -l <"$MATRIX")" = 36
check "the station stayed associated" associated
exit $((failed > 0))
