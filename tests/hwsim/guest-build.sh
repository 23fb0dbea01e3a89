# The guest of the real-802.11 tests, built from Debian's packages into a cache. Sourced by
# run-qemu.sh (which boots it with qemu) and build-box.sh (which packs it as a Vagrant box).
#
# Each part is rebuilt only when its recipe (its inputs and the text of the function that builds it)
# changes:
#   root       debootstrap of this machine's Debian release with the general kernel, its modules and
#              headers, systemd, sshd and what the guest test needs (guest-packages)
#   initramfs  busybox and the drivers for the guest's root: a 9p share (read-only, or under a tmpfs
#              overlay) or a virtio disk; plus the kernel it belongs to
#
#   MACNAT_HWSIM_CACHE   where the guest is kept (default /var/cache/macnat-hwsim)

hwsim_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$hwsim_dir/../.." && pwd)
cache=${MACNAT_HWSIM_CACHE:-/var/cache/macnat-hwsim}
say() { printf 'hwsim: %s\n' "$*" >&2; }
die() { printf 'hwsim: error: %s\n' "$*" >&2; exit 2; }
need_tools() { local tool; for tool; do command -v "$tool" >/dev/null || die "$tool is missing (./setup.sh installs it)"; done; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, qemu, libvirt)"
need_tools debootstrap busybox modprobe cpio zstd

mapfile -t GUEST_PACKAGES < <(sed 's/#.*//' "$hwsim_dir/guest-packages" | tr -s ' \n' '\n' | grep .)
# A whole Debian system besides: systemd as PID 1 with udev and D-Bus (run-qemu.sh's systemd mode,
# the Vagrant box), and what Vagrant needs of a box (sshd, sudo, rsync).
GUEST_PACKAGES=(linux-image-amd64 linux-headers-amd64 systemd systemd-sysv udev dbus openssh-server sudo rsync
                "${GUEST_PACKAGES[@]}")
INITRAMFS_MODULES=(virtio_pci 9pnet_virtio 9p overlay virtio_blk ext4)

# The Debian mirror and release this machine's apt uses: the guest comes from the same place.
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}')
[ -n "$mirror" ] || mirror=$(awk -v s="$codename" '$1 == "deb" && $3 == s {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || die "no Debian mirror for $codename in apt's sources"

# recipe FUNCTION INPUT...: a short hash of the function's text and its inputs.
recipe() { { printf '%s\n' "$@"; declare -f "$1"; } | sha256sum | cut -c1-16; }

# cached PART ARTEFACT INPUT...: run build_PART unless ARTEFACT exists and was built from the same
# recipe; the recipe is left in $cache/PART.recipe, an input for the parts built on this one.
cached() {
    local part=$1 artefact=$2 want started; shift 2
    want=$(recipe "build_$part" "$@")
    if [ "$(cat "$cache/$part.recipe" 2>/dev/null)" = "$want" ] && [ -e "$artefact" ]; then
        say "reusing the guest's $part in $cache (recipe $want)"
        return
    fi
    started=$SECONDS
    mkdir -p "$cache"
    rm -f "$cache/$part.recipe"
    "build_$part"
    echo "$want" >"$cache/$part.recipe"
    say "the guest's $part built in $((SECONDS - started)) s: $(du -sh "$artefact" | cut -f1)"
}

guest_kernel() { ls "$cache/root"/boot/vmlinuz-* | sort -V | tail -n 1; }

build_root() {
    local root="$cache/root.new" ver build
    rm -rf "$root" "$cache/root"
    say "building the guest root with debootstrap ($codename, $(IFS=,; echo "${GUEST_PACKAGES[*]}"))"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${GUEST_PACKAGES[*]}")" "$codename" "$root" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$root/var/cache/apt/archives"/*.deb
    mkdir -p "$root/mnt/share"
    mv "$root" "$cache/root"
    ver=$(guest_kernel); ver=${ver##*/vmlinuz-}
    build=$(readlink "$cache/root/lib/modules/$ver/build")  # absolute: resolve it inside the root
    [ -d "$cache/root$build" ] || die "the guest has no headers for its kernel $ver"
}

build_initramfs() {
    local root="$cache/root" kernel ver init deps order=() mod verb path
    kernel=$(guest_kernel)
    ver=${kernel##*/vmlinuz-}
    say "building the initramfs (busybox and ${INITRAMFS_MODULES[*]} from kernel $ver)"
    deps=$(modprobe -a -d "$root" -S "$ver" --show-depends "${INITRAMFS_MODULES[@]}") \
        || die "modprobe cannot resolve ${INITRAMFS_MODULES[*]} in the guest's kernel $ver"
    init=$(mktemp -d)
    mkdir -p "$init"/{bin,dev,proc,sys,newroot,lower,rw,modules}
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
# Mounts the guest's root as the kernel command line says, then hands over to its init:
#   root=9p ro    the read-only 9p share "rootfs"
#   root=9p rw    the same share under an overlay with a tmpfs upper layer: a writable, throwaway root,
#                 onto which the share's root/ tree (if any) is copied, e.g. units for systemd
#   root=/dev/vda a disk, read-write (the Vagrant box)
#   init=PATH     what runs as PID 1 on it (default /sbin/init)
# A 9p share tagged "share" is mounted at /mnt/share when the VM has one. Never falls back to a
# shell: with no console input, qemu would hang.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod "/modules/$m"; done
root= mode=rw init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root=${arg#root=} ;; init=*) init=${arg#init=} ;; ro|rw) mode=$arg ;; esac
done
fail() { echo "hwsim initramfs: $*"; echo o >/proc/sysrq-trigger; sleep 30; }
opts=trans=virtio,version=9p2000.L,msize=512000
case "$root:$mode" in
    9p:ro) mount -t 9p -o "$opts,cache=loose,ro" rootfs /newroot ;;
    9p:rw) mount -t 9p -o "$opts,cache=loose,ro" rootfs /lower && mount -t tmpfs -o mode=755 rw /rw &&
           mkdir /rw/upper /rw/work &&
           mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot ;;
    /dev/*) for i in $(seq 100); do [ -b "$root" ] && break; sleep 0.1; done
           mount -o rw "$root" /newroot ;;
    *) false ;;
esac || fail "cannot mount the root ($root, $mode)"
if grep -qx share /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag 2>/dev/null; then
    mount -t 9p -o "$opts" share /newroot/mnt/share || fail "cannot mount the 9p share"
    if [ "$root:$mode" = 9p:rw ] && [ -d /newroot/mnt/share/root ]; then cp -a /newroot/mnt/share/root/. /newroot/; fi
fi
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot "$init"
EOF
    chmod +x "$init/init"
    (cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) >"$cache/initramfs.cpio.gz"
    rm -rf "$init"
    cp "$kernel" "$cache/vmlinuz"
}

# The root, then the initramfs for it (with the kernel beside it), each built only when needed.
build_guest() {
    cached root "$cache/root" "$codename" "${GUEST_PACKAGES[*]}"
    cached initramfs "$cache/initramfs.cpio.gz" "$(cat "$cache/root.recipe")" "${INITRAMFS_MODULES[*]}"
}

# build_wheelhouse DIR: macnat from this checkout and its dependencies as wheels, for a guest
# without network (pip install --no-index --find-links DIR macnat).
build_wheelhouse() {
    local python=${MACNAT_HWSIM_PYTHON:-$repo/.venv/bin/python}
    say "building macnat and its dependencies as wheels for the guest"
    mkdir -p "$1"
    "$python" -m pip wheel -q --disable-pip-version-check -w "$1" "$repo" >"$1/wheel.log" 2>&1 \
        || { cat "$1/wheel.log" >&2; die "pip wheel failed"; }
}

# KVM only where the CPU has hardware virtualisation and /dev/kvm is there: some machines have a
# /dev/kvm without vmx/svm (a nested "PVM" variant) on which a stock guest kernel hangs.
# vagrant/Vagrantfile applies the same rule.
kvm_usable() { [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; }
