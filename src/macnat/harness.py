"""The datapath on its own, in a namespace of its own, driven by BPF_PROG_TEST_RUN: for the packet
tests and the per-packet benchmarks.

    namespace <name> (the calling thread enters it: bpf_clone_redirect really transmits there)

      air0 --- wifi0            config.wifi_ifindex
               br0 --- up0 --- up0p    config.bridge_ifindex / uplink_ifindex
                   --- tapA --- vmA    a VM port: what the datapath copies into br0 arrives at vmA
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from dataclasses import dataclass

from macnat import bpfsys, constants, loader, maps
from macnat.maps import Binding, ip_key, mac_bytes
from macnat.netns import Namespace

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VM_PORT = 1000  # the ingress ifindex of frames from "a VM's bridge port": neither 0 (the host) nor wifi0's
EMPTY_PROGRAM = "#include <uapi/linux/pkt_cls.h>\nint empty(struct __sk_buff *skb) { return TC_ACT_OK; }\n"


@dataclass
class Run:
    retval: int
    data: bytes
    moved: dict[str, int]   # counters that changed, by how much
    ns_per_run: float
    mark: int               # skb->mark as the program left it


class Harness:
    def __init__(self, ns_name: str, wifi_mac: str):
        self.ns = Namespace.create(ns_name)
        self._exit = ExitStack()
        try:
            self._build(wifi_mac)
        except BaseException:
            self.close()
            raise

    def _build(self, wifi_mac: str) -> None:
        ns = self.ns
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        ns.ip("link", "add", "wifi0", "address", wifi_mac, "type", "veth", "peer", "name", "air0")
        ns.ip("link", "add", "br0", "type", "bridge")
        for port, peer in (("up0", "up0p"), ("tapA", "vmA")):
            ns.ip("link", "add", port, "type", "veth", "peer", "name", peer)
            ns.ip("link", "set", port, "master", "br0", "up")
            ns.ip("link", "set", peer, "up")
        for dev in ("wifi0", "air0", "br0"):
            ns.ip("link", "set", dev, "up")
        self._exit.enter_context(ns.entered())
        self.bpf = loader.compile_datapath()
        self.fds = {name: self.bpf.load_func(name.encode(), self.bpf.SCHED_CLS).fd for name in constants.PROGRAMS}
        fd = {name: self.bpf[name.encode()].map_fd for name in constants.MAP_NAMES}
        self.maps = maps.Maps({name: maps.Map(name, fd[name], bpfsys.map_info(fd[name])) for name in maps.LAYOUT},
                              {name: fd[name] for name in maps.RINGS})
        self.ifindex = {name: socket.if_nametoindex(name) for name in ("wifi0", "br0", "up0", "vmA")}
        self.set_wifi_mac(wifi_mac)

    def set_wifi_mac(self, mac: str, **settings: int) -> None:
        """The MAC the datapath writes as the Wi-Fi's (the device keeps its own), and any other config
        fields (flags, per-port limits), as the manager sets them."""
        self.maps.config.update(maps.u32(0), maps.Config(
            wifi_mac=mac_bytes(mac), wifi_ifindex=self.ifindex["wifi0"],
            bridge_ifindex=self.ifindex["br0"], uplink_ifindex=self.ifindex["up0"], **settings))

    def empty_program_fd(self) -> int:
        bcc = loader.import_bcc()
        self._empty = bcc.BPF(text=EMPTY_PROGRAM.encode())
        return self._empty.load_func(b"empty", bcc.BPF.SCHED_CLS).fd

    def reset(self, host_addresses: tuple[str, ...] = (), hints: bool = True) -> None:
        """Empty every table (the config stays) and drain the events. vm_hints may keep its slots
        (hints=False; a stale slot only costs a lookup, by design) and clear 4096 slots the faster."""
        for name in maps.LAYOUT:
            if name not in ("config", "counters") and (hints or name != "vm_hints"):
                self.maps.by_name[name].clear()
        for ip in host_addresses:
            self.maps.host_addrs.update(ip_key(ip), maps.u8(1))
        list(self.maps.events())

    def run(self, program: str | int, frame: bytes, ingress_ifindex: int = 0, repeat: int = 1, mark: int = 0) -> Run:
        """Run a datapath program (by name) or any program (by fd) on one frame."""
        fd = self.fds[program] if isinstance(program, str) else program
        before = self.maps.counter_totals()
        result = bpfsys.prog_test_run(fd, frame, repeat=repeat,
                                      ctx=bpfsys.SkBuffCtx(ingress_ifindex=ingress_ifindex, mark=mark))
        after = self.maps.counter_totals()
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        return Run(result.retval, result.data, moved, result.duration_ns, result.ctx.mark)

    def bind(self, ip: str, mac: str, flags: int = 0, port: int = VM_PORT) -> None:
        """A VM on `port` with `ip` bound to its `mac`, as the datapath would have learned it."""
        self.maps.add_vm_mac(mac_bytes(mac), last_seen_ns=1, port=port)
        self.maps.bindings.update(ip_key(ip), Binding(mac=mac_bytes(mac), flags=flags, port=port, last_seen_ns=1))

    def binding(self, ip: str) -> Binding | None:
        return self.maps.bindings.lookup(ip_key(ip))

    def close(self) -> None:
        self._exit.close()
        self.ns.delete()
