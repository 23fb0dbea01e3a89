#!/usr/bin/env bash
# Pack the guest of the real-802.11 tests (guest-build.sh) as a Vagrant box for vagrant-libvirt, and
# print its path:
#
#   vagrant box add --name macnat/bookworm-hwsim "$(sudo tests/hwsim/build-box.sh)"
#
# The box is the cached root as an ext4 disk (qcow2, no partitions, no boot loader) with a layer of
# what Vagrant expects of a box: the `vagrant` user with Vagrant's well-known insecure key and
# passwordless sudo, and DHCP on the NIC (systemd-networkd). vagrant-libvirt boots it directly with
# the guest's kernel and initramfs, which the box carries beside its disk (its own Vagrantfile points
# there). Rebuilt only when its recipe changes, like the root.
#
#   MACNAT_HWSIM_CACHE   where the guest and the box are kept (default /var/cache/macnat-hwsim)
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/guest-build.sh"
need_tools mkfs.ext4 qemu-img unshare
box="$cache/macnat-bookworm-hwsim.box"
insecure_key=$(dpkg -L vagrant | grep '/keys/vagrant\.pub$' | head -n 1)
[ -r "$insecure_key" ] || die "Vagrant's insecure public key is missing (./setup.sh installs vagrant)"
insecure_key=$(cat "$insecure_key")

# box_disk ROOT WORK KEY: WORK/disk.raw, an ext4 image of ROOT with the box's layer on top. Runs in a
# mount namespace of its own: the layer is the upper side of an overlay, so the cached root stays as
# it is and is not copied.
box_disk() {
    local root=$1 work=$2 key=$3 m=$2/merged
    mkdir -p "$work"/{upper,ovl,merged}
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$work/upper,workdir=$work/ovl" "$m"
    echo macnat-hwsim >"$m/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tmacnat-hwsim\n' >"$m/etc/hosts"
    useradd --root "$m" --create-home --shell /bin/bash --user-group vagrant
    echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$m/etc/sudoers.d/vagrant"
    chmod 440 "$m/etc/sudoers.d/vagrant"
    install -d -m 700 "$m/home/vagrant/.ssh"
    echo "$key" >"$m/home/vagrant/.ssh/authorized_keys"
    chmod 600 "$m/home/vagrant/.ssh/authorized_keys"
    chroot "$m" chown -R vagrant:vagrant /home/vagrant/.ssh
    # DHCP on the NIC only: the bridges and veths the guest test makes are its own.
    printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n\n[DHCPv4]\nClientIdentifier=mac\n' \
        >"$m/etc/systemd/network/50-dhcp.network"
    systemctl --root="$m" --quiet enable systemd-networkd.service
    mkfs.ext4 -q -F -L macnat-hwsim -d "$m" "$work/disk.raw" 4G >/dev/null
}

build_box() {
    local work="$cache/box.new"
    rm -rf "$work" "$box"
    mkdir -p "$work/box"
    say "packing the guest as a Vagrant box for vagrant-libvirt"
    unshare --mount --propagation private bash -euo pipefail -c "$(declare -f box_disk); box_disk \"\$@\"" \
        box_disk "$cache/root" "$work" "$insecure_key"
    qemu-img convert -O qcow2 "$work/disk.raw" "$work/box/box.img"
    cp "$cache/vmlinuz" "$cache/initramfs.cpio.gz" "$work/box/"
    echo '{"provider": "libvirt", "format": "qcow2", "virtual_size": 4}' >"$work/box/metadata.json"
    cat >"$work/box/Vagrantfile" <<'EOF'
# The disk has no boot loader: libvirt boots the kernel and initramfs shipped beside it in this box.
# The box is a throwaway test machine on a private network: Vagrant keeps its insecure key rather
# than replacing it (which takes most of a minute of ssh round trips under TCG).
Vagrant.configure("2") do |config|
  config.ssh.insert_key = false
  config.vm.provider :libvirt do |libvirt|
    libvirt.kernel = File.join(__dir__, "vmlinuz")
    libvirt.initrd = File.join(__dir__, "initramfs.cpio.gz")
    libvirt.cmd_line = "root=/dev/vda rw console=ttyS0"
  end
end
EOF
    tar -C "$work/box" -cf - metadata.json Vagrantfile box.img vmlinuz initramfs.cpio.gz | zstd -q -T0 -3 -o "$box"
    rm -rf "$work"
}

build_guest
cached box "$box" "$(cat "$cache/initramfs.recipe")" "$insecure_key" "$(declare -f box_disk)"
echo "$box"
