#!/usr/bin/env bash
# Run a test script (default tests/hwsim/guest-test.sh) in a qemu VM with Debian's kernel and
# mac80211_hwsim, on this checkout, and exit with its status.
#
# The guest (guest-build.sh) boots from the cached root, shared over 9p. A second, writable 9p share
# at /mnt/share carries the script, macnat as a wheelhouse built from this checkout (the guest has no
# network; the script gets MACNAT_PIP_ARGS to install it from there) and the results. KVM is used
# where it works, TCG otherwise. Two ways to run the script, MACNAT_HWSIM_INIT:
#   custom   (default) a read-only root; a small init script as PID 1 mounts what the test needs and
#            runs the script: boots in seconds
#   systemd  a writable throwaway root (an overlay on a tmpfs); systemd is PID 1 and runs the script
#            as a unit once the system is up and udev has settled; the journal is kept in the share
#
#   MACNAT_HWSIM_SCRIPT  the script to run in the guest, as root (default tests/hwsim/guest-test.sh);
#                        guest-lib.sh is beside it in the guest, for it to source
#   MACNAT_HWSIM_ROOT    systemd mode: a directory copied onto the guest's root before the boot
#                        (files of a package, settings, enabled units)
#   MACNAT_HWSIM_CACHE   where the guest is kept (default /var/cache/macnat-hwsim)
#   MACNAT_HWSIM_TIMEOUT seconds the VM may run (default 1200)
#   MACNAT_HWSIM_KEEP    set: keep the share (the script's logs, the console, systemd's journal) in /tmp
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/guest-build.sh"
script=${MACNAT_HWSIM_SCRIPT:-$hwsim_dir/guest-test.sh}
init_mode=${MACNAT_HWSIM_INIT:-custom}
timeout_s=${MACNAT_HWSIM_TIMEOUT:-1200}
need_tools qemu-system-x86_64
[ -r "$script" ] || die "no such script: $script"
case "$init_mode" in custom|systemd) ;; *) die "MACNAT_HWSIM_INIT must be custom or systemd, not '$init_mode'" ;; esac

build_guest

share=$(mktemp -d /tmp/macnat-hwsim-share.XXXXXX)
trap '[ -n "${MACNAT_HWSIM_KEEP:-}" ] || rm -rf "$share"' EXIT
mkdir -p "$share/logs"
build_wheelhouse "$share/wheels"
cp "$script" "$share/script"
cp "$hwsim_dir/guest-lib.sh" "$share/"
guest_env=(HOME=/root MACNAT_LOG_DIR=/mnt/share/logs "MACNAT_PIP_ARGS=--no-index --find-links /mnt/share/wheels macnat")
if [ "$init_mode" = custom ]; then
    cmdline="root=9p ro init=/mnt/share/guest-init.sh"
    cat >"$share/guest-init.sh" <<EOF
#!/bin/bash
# PID 1 of the guest: a read-only root; everything that writes goes to tmpfs or to the share.
mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
for d in /run /tmp /var/tmp /var/lib/dhcp /var/log /root; do mount -t tmpfs tmpfs "\$d"; done
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
echo "guest: kernel \$(uname -r), \$(nproc) vCPU"
env ${guest_env[*]@Q} timeout 900 bash /mnt/share/script >/mnt/share/guest.log 2>&1
echo \$? >/mnt/share/exit-code
sync
echo o >/proc/sysrq-trigger
sleep 30
EOF
    chmod +x "$share/guest-init.sh"
else
    # The initramfs copies the share's root/ onto the writable root: the unit and its enablement.
    cmdline="root=9p rw init=/lib/systemd/systemd"
    mkdir -p "$share/root"
    if [ -n "${MACNAT_HWSIM_ROOT:-}" ]; then cp -a "$MACNAT_HWSIM_ROOT/." "$share/root/"; fi
    units="$share/root/etc/systemd/system"
    mkdir -p "$units/multi-user.target.wants"
    # Type=exec: the unit's start job ends once the script runs, so the boot counts as finished and
    # `systemctl is-system-running --wait` inside the script returns.
    cat >"$units/hwsim-script.service" <<EOF
[Unit]
Description=the test script of tests/hwsim/run-qemu.sh
After=multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=exec
Environment=${guest_env[*]@Q}
ExecStartPre=/bin/udevadm settle
ExecStart=/bin/bash /mnt/share/script
StandardOutput=append:/mnt/share/guest.log
StandardError=inherit
RuntimeMaxSec=900
ExecStopPost=/bin/sh -c 'journalctl -b --no-pager >/mnt/share/journal.log 2>&1; echo "\$EXIT_STATUS" >/mnt/share/exit-code'
EOF
    ln -s ../hwsim-script.service "$units/multi-user.target.wants/hwsim-script.service"
fi

accel=(-accel tcg,thread=multi -cpu max)
if kvm_usable; then accel=(-accel kvm -cpu host); fi
say "booting the guest (${accel[1]%%,*}, $init_mode init), at most ${timeout_s} s"
started=$SECONDS
virtfs=security_model=none,multidevs=remap
timeout "$timeout_s" qemu-system-x86_64 "${accel[@]}" -smp 2 -m 2048 -nic none -nographic -no-reboot \
    -serial mon:stdio -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet $cmdline" \
    -virtfs "local,path=$cache/root,mount_tag=rootfs,$virtfs,readonly=on" \
    -virtfs "local,path=$share,mount_tag=share,$virtfs" </dev/null >"$share/console.log" 2>&1 || true
say "the guest ran for $((SECONDS - started)) s"
status=$(cat "$share/exit-code" 2>/dev/null || true)
if ! [[ $status =~ ^[0-9]+$ ]]; then
    tail -n 60 "$share/console.log" >&2
    if [ -s "$share/journal.log" ]; then tail -n 60 "$share/journal.log" >&2; fi
    if [ -s "$share/guest.log" ]; then cat "$share/guest.log"; fi
    die "the guest did not finish (${status:-no exit status}; console above)"
fi
cat "$share/guest.log"
exit "$status"
