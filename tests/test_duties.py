"""The manager's duties alone: each is fed events against fake tables, no kernel or lab needed.
(What only the kernel can show is in the lab tests: test_laptop_life, test_service, test_attach.)"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from macnat import config, constants, netns
from macnat.manager import events
from macnat.manager import sources
from macnat.manager.duties import ageing, bindings_log, lan_side, network_change, notify, statics
from macnat.manager.loop import Loop
from macnat.manager.state import State
from macnat.maps import Binding, Config, LanMac, MacAddr, Snapshot, VmMac, ip_key, ip_str, mac_bytes, mac_str
from macnat.netlink import Link

VM_MAC, VM2_MAC = "52:54:00:00:01:01", "52:54:00:00:01:02"


class FakeMap:
    """A dict with the interface of macnat.maps.Map (keys compared by their bytes, as the kernel does)."""

    def __init__(self):
        self.elements: dict[bytes, tuple] = {}
        self.deleted: list[bytes] = []

    def items(self):
        return list(self.elements.values())

    def snapshot(self) -> Snapshot:
        pairs = list(self.elements.values())
        key_size = len(bytes(pairs[0][0])) if pairs else 16
        value_size = len(bytes(pairs[0][1])) if pairs else 48
        return Snapshot(key_size, value_size, b"".join(bytes(k) for k, _ in pairs),
                        b"".join(bytes(v) for _, v in pairs), len(pairs))

    def keys(self):
        return [k for k, _ in self.elements.values()]

    def lookup(self, key):
        found = self.elements.get(bytes(key))
        return found[1] if found else None

    def update(self, key, value, flags=0):
        self.elements[bytes(key)] = (key, value)

    def delete(self, key) -> bool:
        self.deleted.append(bytes(key))
        return self.elements.pop(bytes(key), None) is not None

    def clear(self):
        self.elements.clear()


class FakeMaps:
    def __init__(self):
        for name in ("bindings", "vm_macs", "vm_hints", "lan_macs", "lan_addrs", "host_addrs", "refusals", "onlink",
                     "dhcp_requests", "ports", "port_released"):
            setattr(self, name, FakeMap())
        self.counters = {name: 0 for name in constants.COUNTERS}
        self.config = Config(wifi_mac=mac_bytes("02:4d:4e:00:00:0a"), wifi_ifindex=2)

    def current_config(self):
        return self.config

    def counter_total(self, name):
        return self.counters[name]

    def add_vm_mac(self, mac, last_seen_ns):
        self.vm_macs.update(MacAddr(mac), VmMac(last_seen_ns=last_seen_ns))


class FakeDatapath:
    def __init__(self):
        self.maps = FakeMaps()
        self.programs = {}


WIFI = Link(2, "wlan0", "02:4d:4e:00:00:0a", "veth", None, 1500, up=True, carrier=True)
BRIDGE = Link(3, "vmbr0", "02:4d:4e:00:00:b0", "bridge", None, 1500, up=True, carrier=True)
UPLINK = Link(4, "vethmnwlan0", "02:00:00:00:00:04", "veth", 3, 1500, up=True, carrier=True)


@pytest.fixture
def state(tmp_path):
    resolved = config.resolve("wlan0", {"bridge": "vmbr0"}, path=tmp_path / "wlan0.toml", environ={})
    return State("wlan0", resolved, FakeDatapath(), ipr=None, wifi=WIFI, bridge=BRIDGE, uplink=UPLINK)


def bind(state, ip: str, mac: str, last_seen_ns: int, flags: int = 0) -> None:
    state.maps.bindings.update(ip_key(ip), Binding(mac=mac_bytes(mac), flags=flags, last_seen_ns=last_seen_ns))


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# ---- network_change -----------------------------------------------------------------------

HOME = network_change.Network("192.168.77.0/24", "192.168.77.1", "02:4d:4e:00:00:01", "HomeWifi")


@pytest.mark.parametrize("other, same", [
    (replace(HOME, ssid="HomeWifi-5G"), True),                         # two SSIDs of one LAN
    (replace(HOME, subnet="192.168.88.0/24"), False),
    (replace(HOME, gateway="192.168.77.254"), False),
    (replace(HOME, gateway_mac="02:aa:bb:cc:dd:ee"), False),           # another home, same addressing
    (replace(HOME, gateway_mac=None), None),                           # not resolved yet: undecided
], ids=["other-ssid-same-lan", "other-subnet", "other-gateway", "other-router", "router-unresolved"])
def test_a_network_is_its_subnet_gateway_and_gateway_mac(other, same):
    assert other.same_as(HOME) is same


def test_a_new_network_flushes_learned_bindings_and_lan_macs_but_keeps_statics(state, monkeypatch):
    duty = network_change.NetworkChange()
    state.network = HOME
    bind(state, "192.168.77.134", VM_MAC, now_ns())
    bind(state, "fd77:77::134", VM_MAC, now_ns())
    bind(state, "192.168.77.60", VM2_MAC, now_ns(), flags=constants.BINDING_STATIC)
    state.maps.lan_macs.update(MacAddr(mac_bytes("02:4d:4e:00:00:01")), LanMac(last_seen_ns=1))
    away = network_change.Network("192.168.88.0/24", "192.168.88.1", "02:4d:4e:00:01:01", None)
    monkeypatch.setattr(network_change, "current_network", lambda _state: away)
    told = []
    monkeypatch.setattr(duty, "tell_vms", lambda _state, network: told.append(network))
    duty.judge(time.monotonic(), state)
    assert [ip_str(k) for k, _ in state.maps.bindings.items()] == ["192.168.77.60"]
    assert state.maps.lan_macs.items() == []
    assert state.network == away and told == [away]
    assert [type(e) for e in state.posted] == [events.NetworkChanged]


def test_a_first_network_is_only_identified(state, monkeypatch):
    duty = network_change.NetworkChange()
    monkeypatch.setattr(network_change, "current_network", lambda _state: HOME)
    bind(state, "192.168.77.134", VM_MAC, now_ns())
    duty.judge(time.monotonic(), state)
    assert state.network == HOME and len(state.maps.bindings.items()) == 1
    assert [type(e) for e in state.posted] == [events.NetworkIdentified]


def test_an_unresolved_gateway_is_waited_for_then_taken_as_the_same_network(state, monkeypatch):
    duty = network_change.NetworkChange()
    state.network = HOME
    monkeypatch.setattr(network_change, "current_network", lambda _state: replace(HOME, gateway_mac=None))
    start = time.monotonic()
    duty.judge(start, state)
    assert duty.check_at is not None and not state.posted, "looked at again soon"
    duty.judge(start + network_change.GATEWAY_MAC_WAIT + 1, state)
    assert not state.posted and state.network == HOME


# ---- ageing -----------------------------------------------------------------------------

def test_nothing_expires_while_the_wifi_is_down_and_for_one_age_after(state, monkeypatch):
    duty = ageing.Ageing()
    monkeypatch.setattr(duty.prober, "probe", lambda *args: True)
    monkeypatch.setattr(duty.prober, "source", lambda _state: None)
    bind(state, "192.168.77.134", VM_MAC, now_ns() - int(1000e9))  # silent far longer than the age
    state.wifi = replace(WIFI, carrier=False)
    duty.run(time.monotonic(), state)
    state.wifi = WIFI
    duty.run(time.monotonic(), state)
    assert len(state.maps.bindings.items()) == 1, "kept: the VM gets one age to answer a probe"
    duty.run(time.monotonic() + state.settings.age + 1, state)
    assert state.maps.bindings.items() == []
    assert [type(e) for e in state.posted] == [events.BindingsExpired]


def test_static_bindings_never_expire(state, monkeypatch):
    duty = ageing.Ageing()
    bind(state, "192.168.77.60", VM_MAC, 1, flags=constants.BINDING_STATIC)
    duty.run(time.monotonic(), state)
    assert len(state.maps.bindings.items()) == 1 and state.vms == 1


# ---- bindings_log -----------------------------------------------------------------------

def test_the_table_is_read_only_when_the_learning_counters_moved(state, caplog):
    duty = bindings_log.BindingsLog()
    duty.handle(events.Started(), state)
    reads = []
    original = state.maps.bindings.snapshot
    state.maps.bindings.snapshot = lambda: reads.append(1) or original()
    duty.run(time.monotonic(), state)
    assert reads == [], "counters unchanged: no table read"
    bind(state, "192.168.77.134", VM_MAC, now_ns())
    state.maps.counters["learned_ip"] += 1
    with caplog.at_level("INFO", logger="macnat"):
        duty.run(time.monotonic(), state)
    assert reads == [1] and f"learned 192.168.77.134 at {VM_MAC}" in caplog.text


# ---- statics ------------------------------------------------------------------------------

def test_reload_replaces_only_the_statics_that_changed(state):
    duty = statics.Statics()
    old = replace(state.settings, statics={"192.168.77.60": VM_MAC, "192.168.77.61": VM2_MAC})
    new = replace(state.settings, statics={"192.168.77.61": VM2_MAC, "192.168.77.62": VM_MAC})
    duty.install(state, old.statics)
    duty.handle(events.Reloaded(old, new), state)
    rows = {ip_str(k): (mac_str(v.mac), v.flags) for k, v in state.maps.bindings.items()}
    assert rows == {"192.168.77.61": (VM2_MAC, constants.BINDING_STATIC), "192.168.77.62": (VM_MAC, constants.BINDING_STATIC)}


def test_a_static_claiming_a_host_address_is_refused(state, caplog):
    state.host_addresses = {"192.168.77.10": "wlan0"}
    with caplog.at_level("WARNING", logger="macnat"):
        statics.Statics.install(state, {"192.168.77.10": VM_MAC})
    assert state.maps.bindings.items() == []
    assert "static binding 192.168.77.10 refused: it is an address of this host (wlan0)" in caplog.text


# ---- notify -------------------------------------------------------------------------------

def test_ready_is_sent_once_and_only_when_attached(state, tmp_path, monkeypatch):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    duty = notify.Notify()
    state.wifi = None
    duty.handle(events.Started(), state)
    assert listener.recv(4096) == b"STATUS=waiting for wlan0"
    state.wifi = WIFI
    duty.handle(events.WifiAttached(WIFI, again=False), state)
    assert listener.recv(4096).decode().splitlines() == ["READY=1", "STATUS=0 VMs, 0 bindings on wlan0"]
    duty.handle(events.WifiMacChanged("a", "b"), state)
    with pytest.raises(TimeoutError):
        listener.recv(4096)  # nothing changed: nothing sent
    duty.handle(events.Stopping(), state)
    assert listener.recv(4096) == b"STOPPING=1\nSTATUS=detaching"
    duty.close()


def test_abstract_notify_socket_names_are_understood(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "@/org/freedesktop/systemd1/notify/42")
    assert notify.notify_socket_address() == "\0/org/freedesktop/systemd1/notify/42"


# ---- the loop -----------------------------------------------------------------------------

def test_a_failing_duty_does_not_stop_the_others(state, caplog):
    seen = []

    class Broken(statics.Duty):
        def handle(self, event, state):
            raise RuntimeError("boom")

    class Witness(statics.Duty):
        def handle(self, event, state):
            seen.append(type(event))

    loop = Loop(state, [Broken(), Witness()], sources=[])
    with caplog.at_level("ERROR", logger="macnat"):
        loop.dispatch(events.Started())
    assert seen == [events.Started] and "Broken failed on Started" in caplog.text


def test_a_bad_file_on_reload_keeps_the_running_settings(state, caplog):
    state.resolved.path.write_text("age = 0\n")
    loop = Loop(state, [], sources=[])
    with caplog.at_level("ERROR", logger="macnat"):
        assert loop.reload() is None
    assert state.settings.age == 300.0
    assert "reload failed, keeping the running settings" in caplog.text and "age must be a positive number" in caplog.text
    state.resolved.path.write_text('bridge = "vmbr0"\nage = 60\n')
    reloaded = loop.reload()
    assert reloaded.old.age == 300.0 and reloaded.new.age == 60.0 and state.settings.age == 60.0


def test_config_example_reads_back(tmp_path):
    path = tmp_path / "wlan0.toml"
    path.write_text(config.example("wlan0", {"bridge": "vmbr0", "age": 120.0, "statics": {"192.168.1.5": VM_MAC}}))
    assert config.read_file(path) == {"bridge": "vmbr0", "age": 120.0, "statics": {"192.168.1.5": VM_MAC}}
    assert Path(path).read_text().count("# ") > len(config.OPTIONS), "every key is documented"


def test_a_first_network_is_identified_at_once_and_completed_later(state, monkeypatch):
    """The lab's laptop never talks to its router: its MAC completes the network when the host resolves it."""
    duty = network_change.NetworkChange()
    partial = replace(HOME, gateway_mac=None)
    monkeypatch.setattr(network_change, "current_network", lambda _state: partial)
    duty.judge(time.monotonic(), state)
    assert state.network == partial and duty.check_at is None, "nothing polls for the gateway's MAC"
    duty.handle(events.NeighbourChanged(WIFI.index, "192.168.77.50", removed=False), state)
    assert duty.check_at is None, "another LAN host's neighbour entry says nothing of the gateway"
    duty.handle(events.NeighbourChanged(WIFI.index, HOME.gateway, removed=False), state)
    assert duty.check_at is not None, "the host resolved the gateway: judged again at once"
    monkeypatch.setattr(network_change, "current_network", lambda _state: HOME)
    duty.on_timer(time.monotonic(), state)
    assert state.network == HOME and [type(e) for e in state.posted] == [events.NetworkIdentified]


# ---- lan_side ---------------------------------------------------------------------------

GATEWAY, GATEWAY_MAC = "192.168.77.1", "02:4d:4e:00:00:01"


def test_the_gateways_mac_is_pinned_when_the_host_resolves_it(state, monkeypatch):
    duty = lan_side.LanSide()
    monkeypatch.setattr(lan_side.netlink, "onlink_prefixes", lambda _ipr, _index: set())
    resolved: dict[str, str | None] = {GATEWAY: None}
    looked = []
    monkeypatch.setattr(lan_side.netlink, "gateways", lambda _ipr, _index: looked.append(1) or dict(resolved))
    duty.handle(events.Started(), state)
    assert duty.pinned == {GATEWAY: None} and not state.maps.lan_macs.items()
    duty.handle(events.NeighbourChanged(WIFI.index, "192.168.77.50", removed=False), state)   # another LAN host
    duty.handle(events.NeighbourChanged(BRIDGE.index, GATEWAY, removed=False), state)          # not on the Wi-Fi
    assert len(looked) == 1, "only the gateway's own neighbour entry on the Wi-Fi is looked at"
    resolved[GATEWAY] = GATEWAY_MAC
    duty.handle(events.NeighbourChanged(WIFI.index, GATEWAY, removed=False), state)
    (mac_key, lan_mac), = state.maps.lan_macs.items()
    assert mac_str(mac_key.addr) == GATEWAY_MAC and lan_mac.flags & constants.LAN_PINNED


def test_the_lan_sides_timer_only_ages(state, monkeypatch):
    duty = lan_side.LanSide()
    monkeypatch.setattr(lan_side.netlink, "gateways", lambda *_: pytest.fail("no netlink on the timer"))
    state.maps.lan_addrs.update(ip_key("192.168.77.50"), lan_side.LanAddr(last_seen_ns=1))
    duty.on_timer(time.monotonic(), state)
    assert not state.maps.lan_addrs.items()
    assert duty.due() >= time.monotonic() + state.settings.age / 10 - 1


def test_rtnetlink_reports_ip_neighbours_and_not_bridge_fdb_entries():
    ns = netns.Namespace.create(f"{netns.PREFIX}test-rtnl")
    try:
        ns.ip("link", "add", "br9", "type", "bridge")
        ns.ip("link", "add", "d9", "type", "veth", "peer", "name", "d9p")
        ns.ip("link", "set", "d9", "master", "br9", "up")
        with ns.entered():
            source = sources.Rtnetlink()
        index = int(ns.run("cat", "/sys/class/net/d9/ifindex").stdout)
        ns.ip("neigh", "add", "192.168.77.1", "lladdr", GATEWAY_MAC, "dev", "d9")
        ns.run("bridge", "fdb", "add", "02:4d:4e:00:00:99", "dev", "d9", "master", "static")
        ns.ip("neigh", "del", "192.168.77.1", "dev", "d9")
        found = [e for e in source.read() if isinstance(e, events.NeighbourChanged)]
        source.close()
        assert {(e.index, e.address) for e in found} == {(index, "192.168.77.1")}, "no FDB entry among them"
        assert (found[0].removed, found[-1].removed) == (False, True)
    finally:
        ns.delete()
