"""Prerequisites: root, the kernel features macnat's datapath uses (probed, not read from a config
file), Debian's bcc, and kernel headers that bcc compiles a SCHED_CLS program with."""

from __future__ import annotations

import os

from macnat.doctor import probe, topics
from macnat.doctor.core import REGISTRY, check, error, ok, warning

GROUP = "prerequisites"
HEADERS_FIX = "apt install linux-headers-$(uname -r)   # proxmox-headers-$(uname -r) on Proxmox VE; or ./setup.sh"


@check(GROUP, "root", "root", per_target=False)
def root(ctx):
    if ctx.is_root:
        return ok("uid 0")
    skipped = [c.id for c in REGISTRY if c.needs_root]
    return error(f"uid {os.geteuid()}: macnat loads BPF programs and changes network devices; "
                 f"not checked without root: {', '.join(skipped)}",
                 "sudo macnat doctor", topics.NOT_ROOT, skipped=skipped)


def probed(ctx) -> dict:
    return ctx.cached("probe", probe.run)


PROBE_FIX = "the probe needs unshare (util-linux) and root: unshare --net true shows why it cannot run"
KERNEL_FIX = "a kernel built with {option} (every Debian, Ubuntu and Proxmox VE kernel is)"


def _feature(ctx, name: str, what: str, option: str, verdict=error, topic=topics.KERNEL_FEATURES, consequence=""):
    found = probed(ctx)
    if "error" in found:
        return error(found["error"], PROBE_FIX, topics.KERNEL_FEATURES)
    if found[name] is None:
        return ok(f"works: {what}")
    return verdict(found[name] + consequence, KERNEL_FIX.format(option=option), topic)


@check(GROUP, "kernel-clsact", "kernel: clsact", per_target=False, needs_root=True)
def clsact(ctx):
    return _feature(ctx, "clsact", "a clsact qdisc added (on the loopback device of a private network namespace)",
                    "CONFIG_NET_SCH_INGRESS")


@check(GROUP, "kernel-cls-bpf", "kernel: cls_bpf", per_target=False, needs_root=True)
def cls_bpf(ctx):
    return _feature(ctx, "cls_bpf", "a SCHED_CLS program loaded and attached as a direct-action bpf filter",
                    "CONFIG_BPF_SYSCALL and CONFIG_NET_CLS_BPF")


@check(GROUP, "kernel-test-run", "kernel: BPF_PROG_TEST_RUN", per_target=False, needs_root=True)
def test_run(ctx):
    # Only macnat's tests and benchmarks run programs this way: the datapath itself works without it.
    return _feature(ctx, "test_run", "that program run on a test frame returned TC_ACT_OK", "CONFIG_BPF_SYSCALL",
                    warning, consequence=": macnat runs, but its tests and macnat bench need it")


@check(GROUP, "kernel-btf", "kernel: BTF", per_target=False, needs_root=True)
def btf(ctx):
    # bcc loads programs without BTF; what is lost is readable map contents in bpftool and the like.
    return _feature(ctx, "btf", "/sys/kernel/btf/vmlinux is BTF, and BPF_BTF_LOAD accepts BTF", "CONFIG_DEBUG_INFO_BTF", warning,
                    topics.NO_BTF, ": macnat works, but bpftool shows its maps as raw bytes")


@check(GROUP, "bcc", "bcc", per_target=False, needs_root=True)
def bcc(ctx):
    found = probed(ctx)
    if "error" in found:
        return error(found["error"], PROBE_FIX, topics.BCC)
    if "error" in found["bcc"]:
        return error(found["bcc"]["error"], "apt install python3-bpfcc   # never pip install bcc", topics.BCC)
    return ok(f"bcc {found['bcc']['version']} at {found['bcc']['path']}", **found["bcc"])


@check(GROUP, "kernel-headers", "kernel headers", per_target=False, needs_root=True)
def kernel_headers(ctx):
    found = probed(ctx)
    if "error" in found:
        return error(found["error"], PROBE_FIX, topics.KERNEL_HEADERS)
    headers = found["headers"]
    if "error" in headers:
        compiler = f" ({'; '.join(headers['compiler'])})" if headers.get("compiler") else ""
        return error(headers["error"] + compiler, HEADERS_FIX, topics.KERNEL_HEADERS, **headers)
    if "untested" in headers:
        return warning(f"{headers['path']} is there, but not compiled with: {headers['untested']}",
                       "apt install python3-bpfcc, then run macnat doctor again", topics.BCC, **headers)
    return ok(f"{headers['path']} compiles a SCHED_CLS program", **headers)
