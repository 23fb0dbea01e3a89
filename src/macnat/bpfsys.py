"""The few bpf(2) commands macnat needs, through ctypes: objects by ID, their info, map elements,
BPF_PROG_TEST_RUN, loading a tiny program or BTF blob (what `macnat doctor` probes the kernel with), and a
reader of BPF ring buffers (mmap of the map's fd, as libbpf's ring_buffer does).

The manager and the read-only commands use these instead of bcc, so they never load LLVM: a program
or map is found by the ID the kernel reports for an attached filter, which works from any mount
namespace (a bpffs pin does not survive `ip netns exec`, which remounts /sys).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361, "s390x": 351}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_LOAD = 18
BPF_MAP_LOOKUP_BATCH = 24
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_PROG_TYPE_SCHED_CLS = 3
RETURN_OK = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("btf_log_size", ctypes.c_uint32), ("btf_log_level", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info, up to the run-time statistics (the kernel fills as much as we
    ask for)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16),
                ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
                ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
                ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
                ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


# struct __sk_buff up to and including ifindex; BPF_PROG_TEST_RUN accepts this prefix as ctx_in.
SKB_CTX_ROOM = 512  # more than all of struct __sk_buff (192 bytes in 6.x), which ctx_out needs room for
class SkBuffCtx(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32),
                ("queue_mapping", ctypes.c_uint32), ("protocol", ctypes.c_uint32),
                ("vlan_present", ctypes.c_uint32), ("vlan_tci", ctypes.c_uint32),
                ("vlan_proto", ctypes.c_uint32), ("priority", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("ifindex", ctypes.c_uint32)]


class BpfError(OSError):
    pass


# bpf(2) calls made by this process, by command: what a test holds the manager's per-sweep cost to.
calls: dict[int, int] = {}
_NR = _NR_BPF.get(platform.machine())


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    if _NR is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}")
    calls[cmd] = calls.get(cmd, 0) + 1
    ret = _libc.syscall(_NR, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS: the kernel times every BPF program's runs (ProgInfo.run_time_ns, run_cnt) for
    as long as the returned fd is open; the timing itself costs each run a clock read."""
    return _bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _GetFdByIdAttr(id=map_id))


def _info(fd: int, info: ctypes.Structure) -> None:
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                           info=ctypes.addressof(info)))


def prog_info(fd: int) -> tuple[ProgInfo, list[int]]:
    """The program's info and the IDs of the maps it uses."""
    info = ProgInfo()
    _info(fd, info)
    ids = (ctypes.c_uint32 * info.nr_map_ids)()
    info = ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    _info(fd, info)
    return info, list(ids)


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info)
    return info


@functools.cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not online CPU); fixed while the system runs."""
    count = 0
    with open("/sys/devices/system/cpu/possible") as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    return count


@dataclass
class TestRun:
    retval: int
    data: bytes
    duration_ns: int
    ctx: SkBuffCtx | None   # the __sk_buff fields as the program left them, when a ctx was given


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: SkBuffCtx | None = None) -> TestRun:
    """BPF_PROG_TEST_RUN: run a program on a frame; the output frame and the return value.

    A program that calls bpf_clone_redirect really transmits on that ifindex in the calling network
    namespace: run it only in a namespace made for the test.
    """
    out = ctypes.create_string_buffer(len(data) + 256)  # room for a program that grows the frame
    inp = ctypes.create_string_buffer(data, len(data))
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(out),
                        data_in=ctypes.addressof(inp), data_out=ctypes.addressof(out), repeat=repeat)
    ctx_out = ctypes.create_string_buffer(SKB_CTX_ROOM)  # the kernel hands back all of __sk_buff or nothing
    if ctx is not None:
        attr.ctx_in, attr.ctx_size_in = ctypes.addressof(ctx), ctypes.sizeof(ctx)
        attr.ctx_out, attr.ctx_size_out = ctypes.addressof(ctx_out), len(ctx_out)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return TestRun(attr.retval, out.raw[:attr.data_size_out], attr.duration,
                   SkBuffCtx.from_buffer_copy(ctx_out) if ctx is not None else None)


def prog_load(prog_type: int, insns: bytes, name: str) -> int:
    """BPF_PROG_LOAD of raw instructions (8 bytes each); the program's fd."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    return _bpf(BPF_PROG_LOAD, _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8,
                                             insns=ctypes.addressof(code), license=ctypes.addressof(license_),
                                             prog_name=name.encode()[:15]))


def btf_load(blob: bytes) -> int:
    """BPF_BTF_LOAD of a raw BTF blob; its fd."""
    data = ctypes.create_string_buffer(blob, len(blob))
    return _bpf(BPF_BTF_LOAD, _BtfLoadAttr(btf=ctypes.addressof(data), btf_size=len(blob)))


def _found(cmd: int, attr: ctypes.Structure) -> bool:
    """Run a map command; False where the kernel says the element is not there (ENOENT)."""
    try:
        _bpf(cmd, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(fd: int, key, value) -> bool:
    return _found(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                                    value=ctypes.addressof(value)))


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                           value=ctypes.addressof(value), flags=flags))


def map_delete(fd: int, key) -> bool:
    return _found(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=ctypes.addressof(key)))


def map_next_key(fd: int, key, next_key) -> bool:
    """Fill next_key with the key after `key` (or the first key when key is None); False at the end."""
    return _found(BPF_MAP_GET_NEXT_KEY, _MapElemAttr(map_fd=fd, key=ctypes.addressof(key) if key is not None else 0,
                                                     value=ctypes.addressof(next_key)))


def map_lookup_batch(fd: int, keys, values, token: ctypes.Array, first: bool) -> tuple[int, bool]:
    """BPF_MAP_LOOKUP_BATCH (Linux 5.6): fill the arrays `keys` and `values` with up to len(keys)
    elements, continuing from `token` (the kernel's position, carried between calls) unless `first`.
    Returns (elements filled, whether more remain). Raises BpfError(EINVAL) where the kernel or the map
    type has no batch operations, so the caller can fall back to element by element."""
    attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(token), out_batch=ctypes.addressof(token),
                      keys=ctypes.addressof(keys), values=ctypes.addressof(values), count=len(keys), map_fd=fd)
    try:
        _bpf(BPF_MAP_LOOKUP_BATCH, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:  # the last batch: `count` says how many it still filled
            return attr.count, False
        raise
    return attr.count, True


class RingBuffer:
    """The consumer side of a BPF_MAP_TYPE_RINGBUF map, without libbpf or bcc.

    The kernel's layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position, which user space
    writes; page 1 the producer position; the data area follows, mapped twice in a row so that a
    record that wraps around is contiguous. Each record has an 8-byte header: its length, with a busy
    bit while the producer is still writing it and a discard bit for a record given up, then the
    record, padded to 8 bytes. Positions only grow; the data area's size is a power of two.
    """

    BUSY_BIT = 1 << 31
    DISCARD_BIT = 1 << 30
    HEADER_SIZE = 8

    def __init__(self, fd: int):
        info = map_info(fd)
        if info.type != BPF_MAP_TYPE_RINGBUF:
            raise BpfError(errno.EINVAL, f"map {info.name.decode()} is not a ring buffer")
        page = mmap.PAGESIZE
        self.size = info.max_entries
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = page  # where the data area starts in the producer mapping

    def records(self) -> Iterator[bytes]:
        """Every record committed so far, oldest first; each is consumed as it is yielded."""
        consumer = struct.unpack_from("=Q", self._consumer, 0)[0]
        producer = struct.unpack_from("=Q", self._producer, 0)[0]
        while consumer < producer:
            offset = self._data + (consumer & (self.size - 1))
            header = struct.unpack_from("=I", self._producer, offset)[0]
            if header & self.BUSY_BIT:
                break  # the producer is still writing it: the next read gets it
            length = header & ~(self.BUSY_BIT | self.DISCARD_BIT)
            record = None if header & self.DISCARD_BIT else \
                self._producer[offset + self.HEADER_SIZE:offset + self.HEADER_SIZE + length]
            consumer += (self.HEADER_SIZE + length + 7) & ~7
            struct.pack_into("=Q", self._consumer, 0, consumer)
            if record is not None:
                yield record

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
