# What the guest scripts share (sourced by guest-test.sh and guest-service.sh, as root in the guest):
# checks that print PASS/FAIL, namespaces, a DHCP client of our own, the access points (hostapd with
# extra settings, restartable) and macnat installed as a user installs it.
#
#   ns-ap<n>:  hostapd (WPA2-PSK) on an AP radio, bridged into br-lan with dnsmasq (DHCPv4, RA,
#              DHCPv6); ns-lan<n>, a LAN host, hangs off br-lan
#   the guest's own namespace is the laptop: the station radio, vmbr0, and "VMs" ns-vm1, ns-vm2
#
# MACNAT_LOG_DIR: where logs go (default /tmp/hwsim-logs).

LOG=${MACNAT_LOG_DIR:-/tmp/hwsim-logs}
RUN=/tmp/hwsim-run
mkdir -p "$LOG" "$RUN"
AP_NET=192.168.78 AP_NET6=fd78::
LAN_HOST=$AP_NET.20 LAN_HOST6=${AP_NET6}20
AP2_NET=192.168.79 AP2_NET6=fd79::
LAN2_HOST=$AP2_NET.20
VM_MACS=([1]=52:54:00:00:02:01 [2]=52:54:00:00:02:02)
SSID=macnat-hwsim SSID2=macnat-hwsim-2 PSK=correct-horse-battery-staple
passed=0 failed=0

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
phy_of() { basename "$(readlink -f "/sys/class/net/$1/phy80211")"; }

dump_logs() { # the given files of $LOG, then what the captures saw
    say "logs for debugging"
    for f in "$@" checks.log; do
        [ -s "$LOG/$f" ] && { echo "--- $f (last 60 lines)"; tail -n 60 "$LOG/$f"; }
    done
    echo "--- captures on the medium (hwsim0), first 40 frames"
    tcpdump -nn -e -r "$LOG/medium.pcap" 2>/dev/null | head -n 40
    echo "--- captures on the AP's LAN side (br-lan), first 40 frames"
    tcpdump -nn -e -r "$LOG/lan.pcap" 2>/dev/null | head -n 40
}
summary() {
    pkill -f "tcpdump -i" 2>/dev/null; sleep 0.5
    say "summary: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] || dump_logs "$@"
    echo "$passed passed, $failed failed"
}

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

dhcp_again() { # namespace-or-"-", interface: a new DHCPv4 lease from scratch (the running client stopped, its
    # address gone), as a network manager does on a new association: prints the leased address
    local ns=$1 ifc=$2
    kill "$(cat "$RUN/dhclient-$ns-$ifc.pid" 2>/dev/null)" 2>/dev/null
    if [ "$ns" = - ]; then ip -4 addr flush dev "$ifc"; else in_ns "$ns" ip -4 addr flush dev "$ifc"; fi
    dhcp "$ns" "$ifc"
}

install_macnat() { # macnat from $MACNAT_PIP_ARGS into a fresh venv, the way a user installs it: sets $macnat
    python3 -m venv /tmp/macnat-venv
    # shellcheck disable=SC2086
    /tmp/macnat-venv/bin/pip install -q --disable-pip-version-check ${MACNAT_PIP_ARGS:?set MACNAT_PIP_ARGS to what pip installs macnat from} \
        >>"$LOG/checks.log" 2>&1
    check "pip install macnat into a fresh venv" test -x /tmp/macnat-venv/bin/macnat
    macnat=/tmp/macnat-venv/bin/macnat
}

start_ap() { # suffix ("" or 2), phy, its interface, net, net6, SSID, channel, [hostapd.conf lines]: hostapd bridged into a LAN
    local n=$1 phy=$2 ifc=$3 net=$4 net6=$5 ssid=$6 channel=$7 extra=${8:-} ns
    for ns in "ns-ap$n" "ns-lan$n"; do ip netns add "$ns"; in_ns "$ns" ip link set lo up; done
    iw phy "$phy" set netns name "ns-ap$n"
    in_ns "ns-ap$n" ip link add br-lan type bridge
    in_ns "ns-ap$n" ip link add lan0 type veth peer name eth0 netns "ns-lan$n"
    in_ns "ns-ap$n" ip link set lan0 master br-lan up
    in_ns "ns-ap$n" ip addr add "$net.1/24" dev br-lan
    in_ns "ns-ap$n" ip -6 addr add "${net6}1/64" dev br-lan nodad
    in_ns "ns-ap$n" ip link set br-lan up
    in_ns "ns-lan$n" ip addr add "$net.20/24" dev eth0
    in_ns "ns-lan$n" ip -6 addr add "${net6}20/64" dev eth0 nodad
    in_ns "ns-lan$n" ip link set eth0 up
    in_ns "ns-lan$n" ip route add default via "$net.1"
    start_hostapd "$n" "$ifc" "$ssid" "$channel" "$extra"
    in_ns "ns-ap$n" tcpdump -i br-lan -U -w "$LOG/lan$n.pcap" >/dev/null 2>&1 &
    in_ns "ns-ap$n" dnsmasq --conf-file=/dev/null --port=0 --interface=br-lan --bind-interfaces --no-ping \
        --dhcp-authoritative --dhcp-range="$net.100,$net.199,255.255.255.0,1h" \
        --dhcp-option="option:router,$net.1" --enable-ra --dhcp-range="${net6}100,${net6}1ff,slaac,64,1h" \
        --dhcp-leasefile="$RUN/dnsmasq$n.leases" --log-dhcp --log-facility="$LOG/dnsmasq$n.log" \
        --pid-file="$RUN/dnsmasq$n.pid"
}

start_hostapd() { # suffix, interface, SSID, channel, [hostapd.conf lines]: WPA2-PSK, bridged into br-lan
    local n=$1 ifc=$2 ssid=$3 channel=$4 extra=${5:-}
    cat >"$RUN/hostapd$n.conf" <<EOF
interface=$ifc
bridge=br-lan
driver=nl80211
ssid=$ssid
hw_mode=g
channel=$channel
wpa=2
wpa_passphrase=$PSK
wpa_key_mgmt=WPA-PSK
rsn_pairwise=CCMP
$extra
EOF
    in_ns "ns-ap$n" hostapd -B -dd -t -f "$LOG/hostapd$n.log" -P "$RUN/hostapd$n.pid" "$RUN/hostapd$n.conf"
}
stop_hostapd() { # suffix: hostapd gone (it takes its interface out of br-lan and undoes its bridge settings)
    local pid; pid=$(cat "$RUN/hostapd$1.pid")
    kill "$pid"
    wait_for 10 sh -c "! kill -0 $pid"
}

start_station() { # the station wlan1 joins $SSID with wpa_supplicant
    cat >"$RUN/wpa.conf" <<EOF
ctrl_interface=/run/wpa_supplicant
network={
    ssid="$SSID"
    psk="$PSK"
    key_mgmt=WPA-PSK
}
EOF
    wpa_supplicant -B -i wlan1 -c "$RUN/wpa.conf" -dd -t -f "$LOG/wpa_supplicant.log" -P "$RUN/wpa.pid"
}
associated() { wpa_cli -i wlan1 status 2>/dev/null | grep -q '^wpa_state=COMPLETED'; }

start_laptop() { # the station joins $SSID, the laptop leases its own address, vmbr0 and the VMs come:
    # sets $sta_mac and $laptop_ip
    start_station
    sta_mac=$(cat /sys/class/net/wlan1/address)
    check "station $sta_mac associated with WPA2 (wpa_state=COMPLETED)" wait_for 60 associated
    laptop_ip=$(dhcp - wlan1)
    check "the laptop's wlan1 leased $laptop_ip from the AP side" test -n "$laptop_ip"
    add_vms
}

add_vms() { # vmbr0 and the VMs' namespaces on veths in it, their links still down
    local i
    ip link add vmbr0 type bridge
    ip link set vmbr0 up
    for i in 1 2; do
        ip netns add "ns-vm$i"
        in_ns "ns-vm$i" ip link set lo up
        ip link add "tap10$i" type veth peer name eth0 netns "ns-vm$i"
        in_ns "ns-vm$i" ip link set eth0 address "${VM_MACS[$i]}"
        ip link set "tap10$i" master vmbr0 up
    done
}
