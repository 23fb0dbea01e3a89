#!/usr/bin/env bash
# Run the guest test (tests/hwsim/guest-test.sh) under Vagrant: vagrant/Vagrantfile with the local
# box (build-box.sh) on vagrant-libvirt, on this checkout, offline, with KVM where it works and TCG
# otherwise: `vagrant up`, `vagrant provision` (the guest test), `vagrant destroy`. Exits with the
# guest test's status, or 1 when something is left behind.
#
# libvirtd runs without systemd, started here and stopped after, in a network namespace of its own
# (<prefix>libvirt) and a private mount namespace: /run is a tmpfs, /var an overlay whose upper layer
# is a throwaway directory, /etc/libvirt holds this script's configuration, and the user libvirt
# insists on exists in a private copy of /etc/passwd. Its network (a bridge, dnsmasq, NAT rules) thus
# exists only in that namespace; vagrant runs there too. Afterwards no domain, network or volume may
# be left, nor a process in the namespace; then the namespace and the directory go.
#
#   MACNAT_VAGRANT_DRIVER  kvm, or qemu (TCG); default kvm where it works
#   MACNAT_NS_PREFIX       the namespace's prefix (default mn)
#   MACNAT_HWSIM_CACHE     where the guest, the box and Vagrant's home are kept
#                          (default /var/cache/macnat-hwsim)
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/guest-build.sh"
need_tools vagrant libvirtd virsh qemu-system-x86_64 qemu-img nsenter unshare rsync
prefix=${MACNAT_NS_PREFIX:-mn}
ns=${prefix}libvirt

box=$("$hwsim_dir/build-box.sh")
export VAGRANT_HOME="$cache/vagrant.d"
if [ "$(cat "$VAGRANT_HOME/macnat-box.recipe" 2>/dev/null)" != "$(cat "$cache/box.recipe")" ]; then
    say "adding the box as macnat/bookworm-hwsim to $VAGRANT_HOME"
    vagrant box add --force --name macnat/bookworm-hwsim "$box" >"$cache/box-add.log" 2>&1 \
        || { cat "$cache/box-add.log" >&2; die "vagrant box add failed"; }
    cp "$cache/box.recipe" "$VAGRANT_HOME/macnat-box.recipe"
fi

state=$(mktemp -d "/tmp/macnat-vagrant-$prefix.XXXXXX")
libvirtd_pid=
# Whatever is still there on the way out, however the run ended.
clean_up() {
    if [ -n "$libvirtd_pid" ]; then kill "$libvirtd_pid" 2>/dev/null && wait "$libvirtd_pid" 2>/dev/null; fi
    local pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
    ip netns delete "$ns" 2>/dev/null || true
    rm -rf "$state"
}
trap clean_up EXIT
if ip netns list | grep -qw "^$ns"; then say "removing $ns, left by an earlier run"; clean_up; mkdir -p "$state"; fi

# libvirtd's configuration: everything as root, no confinement, cgroups or per-domain namespaces (the
# daemon's own namespaces are the boundary), the domains' consoles in plain files.
mkdir -p "$state"/{etc,var-upper,var-work,log}
cat >"$state/etc/libvirtd.conf" <<EOF
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:$state/log/libvirtd.log"
EOF
cat >"$state/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
EOF
# libvirt's qemu driver looks up its compiled-in user even when told to run domains as root.
cp /etc/passwd "$state/passwd"
cp /etc/group "$state/group"
getent passwd libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin' >>"$state/passwd"
getent group libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:' >>"$state/group"

say "starting libvirtd in the network namespace $ns"
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
state=$state ip netns exec "$ns" unshare --mount --propagation private bash -euc '
    mount -t tmpfs -o mode=755 tmpfs /run
    mount -t overlay overlay -o "lowerdir=/var,upperdir=$state/var-upper,workdir=$state/var-work" /var
    mount --bind "$state/etc" /etc/libvirt
    mount --bind "$state/passwd" /etc/passwd
    mount --bind "$state/group" /etc/group
    exec libvirtd' >"$state/log/libvirtd.out" 2>&1 &
libvirtd_pid=$!
in_ns() { nsenter --target "$libvirtd_pid" --mount --net --wd="$repo/vagrant" "$@"; }
virsh() { in_ns virsh -q -c qemu:///system "$@"; }
for _ in $(seq 150); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
virsh version >/dev/null || { cat "$state/log/libvirtd.out" >&2; die "libvirtd did not start"; }

build_wheelhouse "$state/wheels"
export VAGRANT_DOTFILE_PATH="$state/dot-vagrant" VAGRANT_DEFAULT_PROVIDER=libvirt VAGRANT_NO_COLOR=1 \
    VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
export MACNAT_VAGRANT_BOX=macnat/bookworm-hwsim MACNAT_WHEELHOUSE="$state/wheels" \
    MACNAT_VAGRANT_CONSOLE="$state/log/console.log"
if [ -z "${MACNAT_VAGRANT_DRIVER:-}" ]; then
    if kvm_usable; then MACNAT_VAGRANT_DRIVER=kvm; else MACNAT_VAGRANT_DRIVER=qemu; fi
fi
export MACNAT_VAGRANT_DRIVER

# vagrant STEP...: one vagrant command in the namespace, timed.
vagrant_step() {
    local started=$SECONDS status=0
    say "vagrant $* ($MACNAT_VAGRANT_DRIVER)"
    in_ns vagrant "$@" --no-tty || status=$?
    say "vagrant $1: $((SECONDS - started)) s, exit $status"
    return "$status"
}
status=0
if vagrant_step up --no-provision; then
    vagrant_step provision || status=$?
else
    status=1
fi
if [ "$status" -ne 0 ] && [ -s "$state/log/console.log" ]; then
    echo "--- the VM's console (last 40 lines)"
    tail -n 40 "$state/log/console.log"
fi
vagrant_step destroy --force || status=1

# What vagrant-libvirt leaves by design is the box's image in the storage pool (its cache for the next
# machine): removed with the pool. Anything else is a leak.
left() { # what, names
    if [ -z "$2" ]; then echo "  PASS no $1 left"; else echo "  FAIL $1 left: $2"; status=1; fi
}
left domain "$(virsh list --all --name)"
left network "$(virsh net-list --all --name)"
left volume "$(virsh vol-list default 2>/dev/null | awk '$1 !~ /_vagrant_box_image_/ {print $1}')"
for volume in $(virsh vol-list default 2>/dev/null | awk '{print $1}'); do virsh vol-delete --pool default "$volume" >/dev/null; done
if virsh pool-info default >/dev/null 2>&1; then virsh pool-destroy default >/dev/null; virsh pool-undefine default >/dev/null; fi
kill "$libvirtd_pid"
wait "$libvirtd_pid" || true
libvirtd_pid=
sleep 0.5
left "process in $ns" "$(ip netns pids "$ns" | xargs -r ps -o comm= -p | tr '\n' ' ')"
exit "$status"
