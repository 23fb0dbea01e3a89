#!/usr/bin/env bash
# One idempotent set-up for macnat on Debian 12/13 or Proxmox VE 8, as root:
#   ./setup.sh          install what macnat, its lab and its tests need
#   ./setup.sh demo     ... then run the demo on the built-in lab
#   ./setup.sh test     ... then run the whole test suite (extra arguments go to pytest)
# Running it again changes nothing and takes about a second.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="$repo/.venv"
action=${1:-install}
[ $# -gt 0 ] && shift

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (macnat loads BPF programs and builds network namespaces)"
command -v apt-get >/dev/null || die "this set-up needs a Debian-based system (apt-get)"

# Debian's python3-bpfcc is bcc; PyPI's "bcc" is an unrelated package and is never installed.
# libvirt comes as the bare daemon and its qemu driver, not libvirt-daemon-system: that one would
# enable a libvirtd at boot with a default NAT network on this machine.
# tests/hwsim/run-vagrant.sh starts its own libvirtd in a namespace and stops it.
packages=(python3-bpfcc python3-venv iproute2 nftables dnsmasq-base isc-dhcp-client dhcpcd-base bridge-utils
          iperf3 tcpdump iputils-ping bpftool
          ebtables iptables parprouted dhcp-helper linux-perf   # the benchmarks' alternatives and profile
          qemu-system-x86 debootstrap busybox-static zstd cpio kmod    # the real-802.11 test in a VM
          vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
          qemu-utils rsync e2fsprogs    # ... and under Vagrant, with a libvirtd of the test's own
          dpkg-dev debhelper dh-python build-essential fakeroot python3-pip python3-hatchling  # the .deb
          groff-base systemd systemd-container  # its man page, unit (systemd-analyze) and service (nspawn)
          pipx   # the pipx route's test
          python3-seccomp)   # doctor's test of a kernel without bpf(2): a seccomp filter hides it

# Wait for a dpkg lock another apt run holds, rather than fail.
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
apt_updated=
apt_install() {
    local missing=() p
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$apt_updated" ]; then apt_get update -q >/dev/null; apt_updated=1; fi
    say "installing ${missing[*]}"
    # Start no daemon on install (dhcp-helper and iperf3 ship services): the lab runs its own in namespaces.
    local policy=/usr/sbin/policy-rc.d created=
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
    DEBIAN_FRONTEND=noninteractive apt_get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$created" ]; then rm -f "$policy"; fi
}
apt_has() {
    if [ -z "$apt_updated" ] && ! apt-cache show "$1" >/dev/null 2>&1; then
        apt_get update -q >/dev/null; apt_updated=1
    fi
    apt-cache show "$1" >/dev/null 2>&1
}

apt_install "${packages[@]}"

# bcc compiles BPF C against a kernel header tree at /lib/modules/$(uname -r)/build.
bcc_compiles() {
    /usr/bin/python3 - <<'EOF' >/dev/null 2>&1
from bcc import BPF
BPF(text='#include <uapi/linux/pkt_cls.h>\nint cls(struct __sk_buff *skb) { return TC_ACT_OK; }').load_func("cls", BPF.SCHED_CLS)
EOF
}
kernel=$(uname -r)
modules="/lib/modules/$kernel"
if bcc_compiles; then
    say "kernel headers: $(readlink -f "$modules/build") (already usable by bcc)"
else
    if apt_has "linux-headers-$kernel"; then
        apt_install "linux-headers-$kernel"
        say "kernel headers: installed linux-headers-$kernel, the running kernel's own"
    elif apt_has "proxmox-headers-$kernel"; then
        apt_install "proxmox-headers-$kernel"
        say "kernel headers: installed proxmox-headers-$kernel, the running kernel's own"
    else
        # No headers package for this kernel: Debian's generic headers carry the same networking
        # UAPI (struct __sk_buff, ethhdr, iphdr), which is all the macnat datapath includes.
        arch=$(dpkg --print-architecture)
        apt_install "linux-headers-$arch"
        tree=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
        common="${tree%-"$arch"}-common"
        mkdir -p "$modules"
        ln -sfn "$tree" "$modules/build"
        ln -sfn "$common" "$modules/source"
        say "kernel headers: no package for $kernel; linked Debian's $(basename "$tree") into $modules"
    fi
    bcc_compiles || die "bcc still cannot compile a SCHED_CLS program against $(readlink -f "$modules/build")"
    say "bcc compiles a SCHED_CLS program"
fi

# Debian's ifupdown2, unpacked rather than installed (installing it would take over this machine's
# networking): the lab runs its `ifreload -a` inside a lab namespace only, as Proxmox's "Apply
# Configuration" does (macnat.lab.ifreload).
ifupdown2=/var/cache/macnat-lab/ifupdown2
if [ ! -x "$ifupdown2/usr/share/ifupdown2/ifupdown2" ]; then
    apt_has ifupdown2 || die "no ifupdown2 package in apt's sources"
    tmp=$(mktemp -d) && chmod 755 "$tmp"   # apt downloads as the _apt user
    (cd "$tmp" && apt_get download -q ifupdown2 >/dev/null)
    rm -rf "$ifupdown2.new" && mkdir -p "$(dirname "$ifupdown2")"
    dpkg-deb -x "$tmp"/ifupdown2_*.deb "$ifupdown2.new"
    version=$(dpkg-deb -f "$tmp"/ifupdown2_*.deb Version)
    # Where ifupdown2 looks for its configuration when /etc/network/ifupdown2 does not exist.
    mkdir -p "$ifupdown2.new/usr/share/ifupdown2/etc/network"
    cp -r "$ifupdown2.new/etc/network/ifupdown2" "$ifupdown2.new/usr/share/ifupdown2/etc/network/"
    rm -rf "$ifupdown2" "$tmp" && mv "$ifupdown2.new" "$ifupdown2"
    say "unpacked Debian's ifupdown2 $version into $ifupdown2 (not installed)"
fi

# The venv sees Debian's bcc bindings through one link, not through all of dist-packages.
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    /usr/bin/python3 -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
stamp="$venv/.macnat-installed"
want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing macnat into $venv (editable, with test and benchmark extras)"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test,bench]"
    echo "$want" >"$stamp"
fi
"$venv/bin/python" -c 'import bcc, macnat' || die "the venv cannot import bcc and macnat"
say "ready: $venv/bin/macnat"

case "$action" in
    install) ;;
    demo) exec "$venv/bin/macnat" lab demo "$@" ;;
    test) cd "$repo" && exec "$venv/bin/python" -m pytest "$@" ;;
    *) die "unknown action '$action' (use: install, demo or test)" ;;
esac
