"""Typed access to the datapath's maps, by file descriptor, without bcc.

The record types mirror bpf/macnat.h; tests/test_maps.py checks them field by field against the layout
bcc compiles from that header, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from macnat import bpfsys, constants
from macnat.errors import MacnatError

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
MacBytes = ctypes.c_ubyte * 6


class MacAddr(ctypes.Structure):
    _fields_ = [("addr", MacBytes)]


class IpAddr(ctypes.Structure):
    """IPv6, or IPv4 mapped as ::ffff:a.b.c.d: how every address map keys an address."""

    _fields_ = [("addr", u32 * 4)]


class Config(ctypes.Structure):
    _fields_ = [("wifi_mac", MacBytes), ("build", u16), ("wifi_ifindex", u32), ("bridge_ifindex", u32),
                ("uplink_ifindex", u32), ("flags", u32), ("max_macs_per_port", u32), ("max_ipv4_per_port", u32),
                ("max_ipv6_per_port", u32), ("max_dhcp_per_port", u32), ("events_per_port", u32)]


class Binding(ctypes.Structure):
    _fields_ = [("mac", MacBytes), ("flags", u16), ("port", u32), ("pad", u32), ("last_seen_ns", u64),
                ("tx_packets", u64), ("tx_bytes", u64), ("rx_packets", u64), ("rx_bytes", u64)]


class VmMac(ctypes.Structure):
    _fields_ = [("last_seen_ns", u64), ("port", u32), ("pad", u32)]


class LanMac(ctypes.Structure):
    _fields_ = [("last_seen_ns", u64), ("flags", u32), ("pad", u32)]


class LanAddr(ctypes.Structure):
    _fields_ = [("last_seen_ns", u64), ("mac", MacBytes), ("flags", u16)]


class Refusal(ctypes.Structure):
    _fields_ = [("mac", MacBytes), ("reason", u16), ("owner", MacBytes), ("pad", u16), ("port", u32),
                ("pad2", u32), ("count", u64), ("last_ns", u64)]


class OnlinkKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", IpAddr)]


class OnlinkPrefix(ctypes.Structure):
    _fields_ = [("prefixlen", u32)]


class DhcpRequest(ctypes.Structure):
    _fields_ = [("mac", MacBytes), ("flags", u8), ("message", u8), ("port", u32), ("requests", u32), ("replies", u32),
                ("pad", u32), ("first_ns", u64), ("time_ns", u64)]


class PppoeOwner(ctypes.Structure):
    _fields_ = [("mac", MacBytes), ("pad", u16), ("port", u32), ("last_ns", u64)]


class PortCounts(ctypes.Structure):
    """Per-port counts, indexed as constants.PORT_COUNTS names them."""

    _fields_ = [("count", u64 * len(constants.PORT_COUNTS))]

    def __getitem__(self, kind: str) -> int:
        return self.count[constants.PORT_COUNTS.index(kind)]


class PortState(ctypes.Structure):
    _fields_ = [("learned", PortCounts), ("window_start_ns", u64), ("window_events", u64 * 2),
                ("events_suppressed", u64)]


class Event(ctypes.Structure):
    _fields_ = [("time_ns", u64), ("port", u32), ("kind", u16), ("pad", u16), ("mac", MacBytes),
                ("other", MacBytes), ("ip", IpAddr), ("pad2", u32), ("port_suppressed", u64)]

    @property
    def kind_name(self) -> str:
        """What happened: the name of the counter that goes with it (constants.COUNTERS)."""
        return COUNTER_NAMES[self.kind] if self.kind < len(COUNTER_NAMES) else f"kind {self.kind}"


COUNTER_NAMES = list(constants.COUNTERS)

# map name -> (key type, value type); per-CPU maps are read as one value per possible CPU.
LAYOUT: dict[str, tuple[type, type]] = {
    "config": (u32, Config),
    "counters": (u32, u64),
    "bindings": (IpAddr, Binding),
    "vm_macs": (MacAddr, VmMac),
    "vm_hints": (u32, u8),
    "lan_macs": (MacAddr, LanMac),
    "lan_addrs": (IpAddr, LanAddr),
    "host_addrs": (IpAddr, u8),
    "refusals": (IpAddr, Refusal),
    "onlink": (OnlinkKey, OnlinkPrefix),
    "dhcp_requests": (u32, DhcpRequest),
    "ports": (u32, PortState),
    "port_released": (u32, PortCounts),
    "pppoe": (u32, PppoeOwner),
}
# ring buffers: map name -> the record type
RINGS: dict[str, type] = {"events": Event}
assert set(LAYOUT) | set(RINGS) == set(constants.MAP_NAMES)


IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
BATCH_ELEMENTS = 4096   # elements per BPF_MAP_LOOKUP_BATCH call
ENOTSUPP = 524          # the kernel's internal "not supported", which bpf(2) can return


def ip_key(ip: str) -> IpAddr:
    """An address as the datapath keys it; IPv4 mapped into IPv6. OSError if it is not an address."""
    if ":" in ip:
        return IpAddr.from_buffer_copy(socket.inet_pton(socket.AF_INET6, ip))
    return IpAddr.from_buffer_copy(IPV4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, ip))


def ip_family(key: IpAddr) -> str:
    return "ipv4" if bytes(key)[:12] == IPV4_MAPPED_PREFIX else "ipv6"


def ip_str(key: IpAddr) -> str:
    raw = bytes(key)
    if raw[:12] == IPV4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def mac_bytes(mac: str) -> MacBytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise MacnatError(f"'{mac}' is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)")
    try:
        return MacBytes(*(int(p, 16) for p in parts))
    except ValueError:
        raise MacnatError(f"'{mac}' is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)") from None


def xid_key(xid: int) -> u32:
    """A DHCP transaction id as dhcp_requests keys it: its four bytes as they lie in the frame."""
    return u32(int.from_bytes(xid.to_bytes(4, "big"), "little"))


def vm_hint_slot(mac: MacBytes) -> int:
    """The vm_hints slot of a MAC: hint_slot() in bpf/macnat.c (a test checks they agree)."""
    return (mac[3] << 16 | mac[4] << 8 | mac[5]) % constants.VM_HINT_SLOTS


def mac_str(mac: MacBytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class Snapshot:
    """A table read at once, as raw bytes: element i's key is keys[i * key_size:][:key_size]. Columns
    of the values come out as lists at C speed (memoryview slicing), for scans of 65,536 elements."""

    key_size: int
    value_size: int
    keys: bytes
    values: bytes
    count: int

    def key(self, i: int) -> bytes:
        return self.keys[i * self.key_size:(i + 1) * self.key_size]

    def key_list(self) -> list[bytes]:
        size = self.key_size
        return [self.keys[i:i + size] for i in range(0, self.count * size, size)]

    def column(self, offset: int, fmt: str) -> list[int]:
        """One field of every value: at byte `offset`, of struct format 'Q', 'I', 'H' or 'B'."""
        width = {"Q": 8, "I": 4, "H": 2, "B": 1}[fmt]
        if offset % width or self.value_size % width:
            raise ValueError(f"a {fmt} field at offset {offset} is not aligned in {self.value_size}-byte values")
        if not self.count:
            return []
        return memoryview(self.values).cast(fmt)[offset // width::self.value_size // width].tolist()

    def field(self, name: str, value_type) -> list:
        """Field `name` of the ctypes record `value_type`, for every element."""
        descriptor = getattr(value_type, name)
        if descriptor.size == 6:  # a MAC
            return [self.values[i + descriptor.offset:i + descriptor.offset + 6]
                    for i in range(0, self.count * self.value_size, self.value_size)]
        return self.column(descriptor.offset, {8: "Q", 4: "I", 2: "H", 1: "B"}[descriptor.size])


class OtherBuild(MacnatError):
    """A running datapath that another macnat version built: its tables are not laid out as this one's."""


class Map:
    """One BPF map with typed keys and values."""

    def __init__(self, name: str, fd: int, info: bpfsys.MapInfo):
        self.name, self.fd = name, fd
        self.key_type, self.value_type = LAYOUT[name]
        self.percpu = info.type in (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, bpfsys.BPF_MAP_TYPE_PERCPU_HASH)
        self.array = info.type in (bpfsys.BPF_MAP_TYPE_ARRAY, bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY)
        self.max_entries = info.max_entries
        self._batches: bool | None = None  # whether BPF_MAP_LOOKUP_BATCH works on this map (tried once)
        if (info.key_size, info.value_size) != (ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)):
            raise OtherBuild(f"map '{name}' has key/value sizes {info.key_size}/{info.value_size}, this macnat "
                             f"expects {ctypes.sizeof(self.key_type)}/{ctypes.sizeof(self.value_type)}: "
                             "the attached datapath is from another macnat version (macnat attach replaces it)")

    def _value_buffer(self):
        if self.percpu:
            return (self.value_type * bpfsys.possible_cpus())()
        return self.value_type()

    def lookup(self, key):
        value = self._value_buffer()
        return value if bpfsys.map_lookup(self.fd, key, value) else None

    def update(self, key, value, flags: int = bpfsys.BPF_ANY) -> None:
        bpfsys.map_update(self.fd, key, value, flags)

    def delete(self, key) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def keys(self) -> Iterator:
        key, nxt = None, self.key_type()
        while bpfsys.map_next_key(self.fd, key, nxt):
            key, nxt = nxt, self.key_type()
            yield key

    def items(self) -> Iterator[tuple]:
        """Every element; a few BPF_MAP_LOOKUP_BATCH calls for a whole table where the kernel has them."""
        chunks = self._batched_chunks()
        if chunks is None:
            yield from self._items_one_by_one()
            return
        for keys, values, count in chunks:
            yield from zip(self._elements(keys, count), self._elements(values, count))

    def snapshot(self) -> Snapshot:
        """The whole table as raw bytes: what the manager scans without a Python object per element."""
        chunks = self._batched_chunks()
        key_size, value_size = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        if chunks is None:
            pairs = list(self._items_one_by_one())
            return Snapshot(key_size, value_size, b"".join(bytes(k) for k, _ in pairs),
                            b"".join(bytes(v) for _, v in pairs), len(pairs))
        return Snapshot(key_size, value_size,
                        b"".join(bytes(memoryview(keys).cast("B")[:count * key_size]) for keys, _, count in chunks),
                        b"".join(bytes(memoryview(values).cast("B")[:count * value_size]) for _, values, count in chunks),
                        sum(count for _, _, count in chunks))

    def _items_one_by_one(self) -> Iterator[tuple]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                yield key, value

    def _batched_chunks(self) -> list | None:
        """The table as (keys, values, count) per BPF_MAP_LOOKUP_BATCH call, or None where the kernel has
        no batch operations for it (tried once per map)."""
        if self._batches is False or self.percpu:
            return None
        size = min(self.max_entries, BATCH_ELEMENTS)
        token = (ctypes.c_uint8 * max(8, ctypes.sizeof(self.key_type)))()
        chunks, first, more = [], True, True
        try:
            while more:
                keys, values = (self.key_type * size)(), (self.value_type * size)()
                count, more = bpfsys.map_lookup_batch(self.fd, keys, values, token, first)
                first = False
                chunks.append((keys, values, count))
        except bpfsys.BpfError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                raise
            self._batches = False
            return None
        self._batches = True
        return chunks

    @staticmethod
    def _elements(array, count: int) -> list:
        """The first `count` elements as ctypes objects (an array of a simple type hands out plain ints)."""
        element = array._type_
        if issubclass(element, ctypes._SimpleCData):
            return [element(v) for v in array[:count]]
        return array[:count]

    def clear(self) -> None:
        """Remove every element; an array's elements cannot go, so those that are not zero become zero."""
        zero = bytes(self._value_buffer())
        for key in list(self.keys()):
            if not self.array:
                self.delete(key)
            elif bytes(self.lookup(key)) != zero:
                self.update(key, self._value_buffer())


@dataclass
class Maps:
    """All maps of one attachment, by name; the ring buffers' fds by name."""

    by_name: dict[str, Map]
    rings: dict[str, int] = field(default_factory=dict)
    _events: bpfsys.RingBuffer | None = field(default=None, repr=False)

    def __getattr__(self, name: str) -> Map:
        try:
            return self.by_name[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_prog_ids(cls, prog_ids: list[int]) -> Maps:
        fds = [bpfsys.prog_fd_by_id(prog_id) for prog_id in prog_ids]
        try:
            return cls.from_prog_fds(fds)
        finally:
            for fd in fds:
                os.close(fd)

    @classmethod
    def from_prog_fds(cls, prog_fds: list[int]) -> Maps:
        """The maps the programs use, each opened once (the caller keeps the program fds)."""
        by_name: dict[str, Map] = {}
        rings: dict[str, int] = {}
        for prog_fd in prog_fds:
            _, map_ids = bpfsys.prog_info(prog_fd)
            for map_id in map_ids:
                fd = bpfsys.map_fd_by_id(map_id)
                info = bpfsys.map_info(fd)
                name = info.name.decode()
                if name in LAYOUT and name not in by_name:
                    by_name[name] = Map(name, fd, info)
                elif name in RINGS and name not in rings:
                    rings[name] = fd
                else:
                    os.close(fd)
        missing = set(constants.MAP_NAMES) - set(by_name) - set(rings)
        if missing:
            for fd in [m.fd for m in by_name.values()] + list(rings.values()):
                os.close(fd)
            raise MacnatError(f"the attached programs lack the maps {sorted(missing)}: not a macnat datapath of this version")
        return cls(by_name, rings)

    def close(self) -> None:
        for m in self.by_name.values():
            os.close(m.fd)
        if self._events is not None:
            self._events.close()
        for fd in self.rings.values():
            os.close(fd)

    def events(self) -> Iterator[Event]:
        """The datapath's events (rate-limited per port there) since the last call, oldest first."""
        if self._events is None:
            self._events = bpfsys.RingBuffer(self.rings["events"])
        for record in self._events.records():
            yield Event.from_buffer_copy(record.ljust(ctypes.sizeof(Event), b"\0"))

    def current_config(self) -> Config:
        return self.by_name["config"].lookup(u32(0))

    def add_vm_mac(self, mac: MacBytes, last_seen_ns: int, port: int = 0) -> None:
        """Make a MAC known as a VM's, as the datapath's commit_mac() does; with port 0, the first bridge
        port that uses it takes it (a static VM's)."""
        self.by_name["vm_macs"].update(MacAddr(mac), VmMac(last_seen_ns=last_seen_ns, port=port))
        self.by_name["vm_hints"].update(u32(vm_hint_slot(mac)), u8(1))

    def counter_total(self, name: str) -> int:
        """One counter, summed over the CPUs."""
        per_cpu = self.by_name["counters"].lookup(u32(constants.COUNTER_INDEX[name]))
        return sum(per_cpu) if per_cpu is not None else 0

    def counter_totals(self) -> dict[str, int]:
        return {name: self.counter_total(name) for name in constants.COUNTER_INDEX}
