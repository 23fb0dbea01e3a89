"""The kernel and toolchain probe: run as `unshare --net python -m macnat.doctor.probe` in a network
namespace of its own, so what it creates (a clsact qdisc and a filter on its loopback device) goes
away with it and the host's interfaces are never touched. It prints one JSON object:

- clsact, cls_bpf, test_run, btf: null when the kernel has the feature, else what failed;
- bcc: {"version", "path"} or {"error"} (loader.import_bcc: Debian's bcc, not PyPI's namesake);
- headers: {"path"} when bcc compiled and loaded a SCHED_CLS program against them, else {"error"}.

The compile runs here rather than in doctor itself because bcc's compiler writes its errors to
stderr (doctor keeps them as evidence) and brings LLVM in.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from macnat import bpfsys, loader
from macnat.errors import MacnatError

# r0 = 0 (TC_ACT_OK); exit
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
SCHED_CLS_SOURCE = "#include <uapi/linux/pkt_cls.h>\nint cls(struct __sk_buff *skb) { return TC_ACT_OK; }\n"
TIMEOUT = 300  # the compile takes seconds, minutes under emulation (the hwsim VM)


def minimal_btf() -> bytes:
    """A BTF blob with one type, `int` (32-bit signed): the smallest thing BPF_BTF_LOAD accepts."""
    strings = b"\0int\0"
    int_type = struct.pack("<IIII", 1, 1 << 24, 4, (1 << 24) | 32)  # name "int", BTF_KIND_INT, 4 bytes
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(int_type), len(int_type), len(strings))
    return header + int_type + strings


def _failed(what: str, exc: OSError) -> str:
    return f"{what}: {exc.strerror or exc}"


def kernel_features() -> dict[str, str | None]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from macnat.plumbing import TC_PARENT

    found: dict[str, str | None] = {}
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.tc("add", "clsact", lo)
            found["clsact"] = None
        except NetlinkError as exc:
            found["clsact"] = _failed("tc qdisc add dev lo clsact", OSError(exc.code, os.strerror(exc.code)))
        try:
            fd = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_SCHED_CLS, bpfsys.RETURN_OK, "macnat_probe")
        except OSError as exc:
            found["cls_bpf"] = found["test_run"] = _failed("bpf(BPF_PROG_LOAD) of a SCHED_CLS program", exc)
        else:
            if found["clsact"] is None:
                try:
                    ipr.tc("add-filter", "bpf", lo, 1, fd=fd, name="macnat_probe", parent=TC_PARENT["ingress"],
                           classid=1, direct_action=True)
                    found["cls_bpf"] = None
                except NetlinkError as exc:
                    found["cls_bpf"] = _failed("tc filter add bpf da", OSError(exc.code, os.strerror(exc.code)))
            else:
                found["cls_bpf"] = "not tried: no clsact qdisc to attach to"
            try:
                run = bpfsys.prog_test_run(fd, bytes(64))
                found["test_run"] = None if run.retval == 0 else f"the program returned {run.retval}, not 0"
            except OSError as exc:
                found["test_run"] = _failed("bpf(BPF_PROG_TEST_RUN)", exc)
            os.close(fd)
    found["btf"] = btf_problem()
    return found


def btf_problem() -> str | None:
    try:
        head = VMLINUX_BTF.read_bytes()[:2]
    except OSError as exc:
        return _failed(f"no {VMLINUX_BTF}", exc)
    if len(head) < 2 or struct.unpack("<H", head)[0] != BTF_MAGIC:
        return f"{VMLINUX_BTF} is not BTF"
    try:
        os.close(bpfsys.btf_load(minimal_btf()))
    except OSError as exc:
        return _failed("bpf(BPF_BTF_LOAD)", exc)
    return None


def toolchain() -> dict[str, dict]:
    found: dict[str, dict] = {}
    try:
        bcc = loader.import_bcc()
    except MacnatError as exc:
        bcc = None
        found["bcc"] = {"error": str(exc)}
    else:
        found["bcc"] = {"version": getattr(bcc, "__version__", "unknown"), "path": str(Path(bcc.__file__).resolve().parent)}
    try:
        build = loader.kernel_headers()
    except MacnatError as exc:
        found["headers"] = {"error": str(exc)}
        return found
    if bcc is None:
        found["headers"] = {"path": str(build.resolve()), "untested": "bcc is missing"}
        return found
    try:
        bcc.BPF(text=SCHED_CLS_SOURCE).load_func("cls", bcc.BPF.SCHED_CLS)
        found["headers"] = {"path": str(build.resolve())}
    except Exception as exc:  # bcc raises bare Exception; the compiler's own words went to stderr
        found["headers"] = {"error": f"bcc could not compile and load a SCHED_CLS program against {build}: {exc}"}
    return found


def run() -> dict:
    """Run the probe in a network namespace of its own; its findings, or {"error": why it did not run}."""
    try:
        proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "macnat.doctor.probe"],
                              capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"the probe did not run: {exc}"}
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        detail = proc.stderr.strip().splitlines()
        return {"error": f"the probe failed: {detail[-1] if detail else f'exit {proc.returncode}'}"}
    compiler = [line.strip() for line in proc.stderr.splitlines() if "error" in line.lower()]
    if compiler and "error" in found.get("headers", {}):
        found["headers"]["compiler"] = compiler[:3]
    return found


def main() -> None:
    found: dict = {}
    found.update(kernel_features())
    found.update(toolchain())
    print(json.dumps(found))


if __name__ == "__main__":
    main()
