#!/usr/bin/env bash
# Run tests/hwsim/guest-test.sh in a qemu VM with Debian's kernel and mac80211_hwsim, on this checkout.
#
# The guest is built from Debian's packages (debootstrap, the Debian kernel with its modules and
# headers) into a cache, reused while its recipe is unchanged. It boots from a read-only 9p root
# with a small busybox initramfs; a second, writable 9p share carries the test, macnat as a wheelhouse
# built from this checkout (the guest has no network), and the results. KVM is used where it works
# (vmx/svm and /dev/kvm), TCG otherwise. Exits with the guest test's status.
#
#   MACNAT_HWSIM_CACHE   where the guest is kept (default /var/cache/macnat-hwsim)
#   MACNAT_HWSIM_TIMEOUT seconds the VM may run (default 1200)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$repo/tests/hwsim"
cache=${MACNAT_HWSIM_CACHE:-/var/cache/macnat-hwsim}
timeout_s=${MACNAT_HWSIM_TIMEOUT:-1200}
say() { printf 'hwsim: %s\n' "$*" >&2; }
die() { printf 'hwsim: error: %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap)"
for tool in qemu-system-x86_64 debootstrap busybox modprobe cpio zstd; do
    command -v "$tool" >/dev/null || die "$tool is missing (./setup.sh installs it)"
done

mapfile -t GUEST_PACKAGES < <(sed 's/#.*//' "$here/guest-packages" | tr -s ' \n' '\n' | grep .)
GUEST_PACKAGES=(linux-image-amd64 linux-headers-amd64 "${GUEST_PACKAGES[@]}")
INITRAMFS_MODULES=(virtio_pci 9pnet_virtio 9p)

# The Debian mirror and release this machine's apt uses: the guest comes from the same place.
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}')
[ -n "$mirror" ] || mirror=$(awk -v s="$codename" '$1 == "deb" && $3 == s {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || die "no Debian mirror for $codename in apt's sources"

# Two cached parts, each rebuilt only when its recipe (inputs and the function that builds it) changes.
recipe() { printf '%s\n' "$@" "$(sed -n "/^$1()/,/^}/p" "$0")" | sha256sum | cut -c1-16; }

build_root() {
    local root="$cache/root.new"
    rm -rf "$root" "$cache/root"
    mkdir -p "$cache"
    say "building the guest root with debootstrap ($codename, $(IFS=,; echo "${GUEST_PACKAGES[*]}"))"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${GUEST_PACKAGES[*]}")" "$codename" "$root" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$root/var/cache/apt/archives"/*.deb
    mkdir -p "$root/mnt/share"
    local kernel ver build
    kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
    ver=${kernel##*/vmlinuz-}
    build=$(readlink "$root/lib/modules/$ver/build")  # absolute: resolve it inside the root
    [ -d "$root$build" ] || die "the guest has no headers for its kernel $ver"
    mv "$root" "$cache/root"
}

build_initramfs() {
    local root="$cache/root" kernel ver init deps order=() mod verb path
    kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
    ver=${kernel##*/vmlinuz-}
    say "building the initramfs (busybox and ${INITRAMFS_MODULES[*]} from kernel $ver)"
    deps=$(modprobe -a -d "$root" -S "$ver" --show-depends "${INITRAMFS_MODULES[@]}") \
        || die "modprobe cannot resolve ${INITRAMFS_MODULES[*]} in the guest's kernel $ver"
    init=$(mktemp -d)
    mkdir -p "$init"/{bin,dev,proc,sys,newroot,modules}
    cp "$(command -v busybox)" "$init/bin/busybox"
    while read -r verb path _; do
        [ "$verb" = insmod ] || continue
        mod=$(basename "$path")
        case "$mod" in
            *.ko.xz) xz -dc "$path" >"$init/modules/${mod%.xz}"; mod=${mod%.xz} ;;
            *.ko.zst) zstd -qdc "$path" >"$init/modules/${mod%.zst}"; mod=${mod%.zst} ;;
            *) cp "$path" "$init/modules/$mod" ;;
        esac
        order+=("$mod")
    done < <(awk '!seen[$0]++' <<<"$deps")
    [ ${#order[@]} -gt 0 ] || die "no modules to load for ${INITRAMFS_MODULES[*]}"
    printf '%s\n' "${order[@]}" >"$init/modules/order"
    cat >"$init/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod "/modules/$m"; done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,cache=loose,ro" rootfs /newroot && mount -t 9p -o "$opts" share /newroot/mnt/share \
    || { echo "hwsim initramfs: cannot mount the 9p shares"; echo o > /proc/sysrq-trigger; }
umount /proc
exec switch_root /newroot /bin/bash /mnt/share/guest-init.sh
EOF
    chmod +x "$init/init"
    (cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) >"$cache/initramfs.cpio.gz"
    rm -rf "$init"
    cp "$kernel" "$cache/vmlinuz"
}

root_recipe=$(recipe build_root "$codename" "${GUEST_PACKAGES[*]}")
if [ "$(cat "$cache/root.recipe" 2>/dev/null)" = "$root_recipe" ] && [ -d "$cache/root" ]; then
    say "reusing the guest root in $cache (recipe $root_recipe)"
else
    started=$SECONDS
    build_root
    echo "$root_recipe" >"$cache/root.recipe"
    say "guest root built in $((SECONDS - started)) s: $(du -sh "$cache/root" | cut -f1)"
fi
initramfs_recipe=$(recipe build_initramfs "$root_recipe" "${INITRAMFS_MODULES[*]}")
if [ "$(cat "$cache/initramfs.recipe" 2>/dev/null)" != "$initramfs_recipe" ] || [ ! -s "$cache/initramfs.cpio.gz" ]; then
    build_initramfs
    echo "$initramfs_recipe" >"$cache/initramfs.recipe"
fi

share=$(mktemp -d /tmp/macnat-hwsim-share.XXXXXX)
trap 'rm -rf "$share"' EXIT
mkdir -p "$share/logs" "$share/wheels"
say "building macnat and its dependencies as wheels for the guest"
python=${MACNAT_HWSIM_PYTHON:-$repo/.venv/bin/python}
"$python" -m pip wheel -q --disable-pip-version-check -w "$share/wheels" "$repo" >"$share/logs/wheel.log" 2>&1 \
    || { cat "$share/logs/wheel.log" >&2; die "pip wheel failed"; }
cp "$here/guest-test.sh" "$share/"
cat >"$share/guest-init.sh" <<'EOF'
#!/bin/bash
# PID 1 of the guest: a read-only root; everything that writes goes to tmpfs or to the share.
mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
for d in /run /tmp /var/tmp /var/lib/dhcp /var/log /root; do mount -t tmpfs tmpfs "$d"; done
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
echo "guest: kernel $(uname -r), $(nproc) vCPU"
MACNAT_LOG_DIR=/mnt/share/logs MACNAT_PIP_ARGS="--no-index --find-links /mnt/share/wheels macnat" \
    timeout 900 bash /mnt/share/guest-test.sh >/mnt/share/guest.log 2>&1
echo $? >/mnt/share/exit-code
sync
echo o >/proc/sysrq-trigger
sleep 30
EOF

accel=(-accel tcg,thread=multi -cpu max)
if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=(-accel kvm -cpu host); fi
say "booting the guest (${accel[1]%%,*}), at most ${timeout_s} s"
started=$SECONDS
virtfs=security_model=none,multidevs=remap
timeout "$timeout_s" qemu-system-x86_64 "${accel[@]}" -smp 2 -m 2048 -nic none -nographic -no-reboot \
    -serial mon:stdio -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet" \
    -virtfs "local,path=$cache/root,mount_tag=rootfs,$virtfs,readonly=on" \
    -virtfs "local,path=$share,mount_tag=share,$virtfs" </dev/null >"$share/console.log" 2>&1 || true
say "the guest ran for $((SECONDS - started)) s"
if [ ! -s "$share/exit-code" ]; then
    tail -n 60 "$share/console.log" >&2
    [ -s "$share/guest.log" ] && cat "$share/guest.log"
    die "the guest did not finish (console above)"
fi
cat "$share/guest.log"
exit "$(cat "$share/exit-code")"
