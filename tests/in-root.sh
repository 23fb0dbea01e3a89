#!/bin/sh
# in-root.sh ROOT COMMAND...: COMMAND chrooted in ROOT with the kernel file systems a system has,
# mounted in a mount namespace of its own (they go when it ends, also when it is killed), and fenced
# so that nothing run in the root (a package's maintainer script, say) changes this machine: /dev is
# a tmpfs with the basic nodes, not this machine's; /sys is read-only; so is /proc/sys, but for
# /proc/sys/net when COMMAND runs in a named network namespace (`ip netns exec NS`), whose settings
# those are.
set -e
root=$1
shift
exec unshare --mount --propagation slave -- /bin/sh -ec '
    root=$1
    shift
    mount -t proc proc "$root/proc"
    mount --bind "$root/proc/sys" "$root/proc/sys"
    mount -o remount,bind,ro "$root/proc/sys"
    if [ -n "$(ip netns identify)" ]; then
        mount --bind "$root/proc/sys/net" "$root/proc/sys/net"
        mount -o remount,bind,rw "$root/proc/sys/net"
    fi
    mount -t sysfs -o ro sysfs "$root/sys"
    mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
    for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
        name=${node%%:*} numbers=${node#*:}
        mknod -m 0666 "$root/dev/$name" c "${numbers%:*}" "${numbers#*:}"
    done
    mkdir "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    exec chroot "$root" "$@"
' in-root "$root" "$@"
