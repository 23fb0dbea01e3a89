"""Notices that the laptop is on another network, forgets the old one and tells the VMs.

A network is its IPv4 subnet, its gateway and the gateway's MAC as the host sees them on the Wi-Fi
interface (two SSIDs of one LAN are one network; two homes that both use 192.168.1.0/24 with a
router at .1 are two, told apart by the router's MAC). An SSID change is a hint: the host's new
addresses and routes decide. After a change every learned binding, LAN MAC and FDB entry of the old
network goes (static bindings stay), and the VMs are told: guests re-ask for their addresses when
their link goes down and up, so macnat bounces the carrier of the VM ports it can reach (a veth whose
peer is in another namespace: containers, the lab's VMs) and runs the configured hook for the rest
(QEMU taps: the guest's link is QEMU's, see /usr/share/macnat/hooks/).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass

from macnat import constants, netlink
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Duty

log = logging.getLogger("macnat")
SETTLE = 1.0            # seconds of quiet after an address or route change before the network is judged
GATEWAY_MAC_WAIT = 10.0  # seconds to wait for the host's default route and its gateway's MAC
BOUNCE_DOWN = 1.5       # seconds a VM port stays down: long enough for guests to see the carrier go
HOOK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Network:
    subnet: str | None
    gateway: str | None
    gateway_mac: str | None
    ssid: str | None

    def describe(self) -> str:
        where = f"{self.subnet or 'no IPv4 subnet'}" + (f" via {self.gateway}" if self.gateway else "")
        if self.gateway_mac:
            where += f" ({self.gateway_mac})"
        return (f"'{self.ssid}' " if self.ssid else "") + where

    @property
    def complete(self) -> bool:
        """Whether the host knows all of it: an address, a gateway, the gateway's MAC."""
        return bool(self.subnet and self.gateway and self.gateway_mac)

    def same_as(self, other: Network) -> bool | None:
        """False when something both know differs; True when all of it is known and equal; None when
        what is known is equal but something is not known yet (a route or neighbour still missing)."""
        if self.subnet != other.subnet:
            return False
        for mine, theirs in ((self.gateway, other.gateway), (self.gateway_mac, other.gateway_mac)):
            if mine and theirs and mine != theirs:
                return False
        return True if self.complete and other.complete else None


def current_network(state) -> Network | None:
    if state.wifi is None:
        return None
    subnets = sorted(netlink.ipv4_networks(state.ipr, state.wifi.index), key=str)
    if not subnets:
        return None
    ipv4_gateways = sorted((ip, mac) for ip, mac in netlink.gateways(state.ipr, state.wifi.index).items() if ":" not in ip)
    gateway, gateway_mac = ipv4_gateways[0] if ipv4_gateways else (None, None)
    return Network(str(subnets[0]), gateway, gateway_mac, state.association.ssid)


class NetworkChange(Duty):
    def __init__(self):
        self.check_at: float | None = None
        self.undecided_since: float | None = None
        self.bounced: list[netlink.Link] = []
        self.up_at: float | None = None
        self.hook: subprocess.Popen | None = None
        self.hook_deadline = 0.0
        self.hook_poll_at: float | None = None

    def handle(self, event_, state) -> None:
        wifi_index = state.wifi.index if state.wifi else None
        if isinstance(event_, (events.Started, events.WifiAttached, events.WifiAssociation, events.Overrun)):
            self.schedule(0.0 if isinstance(event_, events.Started) else SETTLE)
        elif isinstance(event_, events.AddressChanged) and event_.index == wifi_index and event_.family == socket.AF_INET:
            self.schedule(SETTLE)
        elif isinstance(event_, events.RouteChanged) and event_.family == socket.AF_INET:
            self.schedule(SETTLE)
        elif isinstance(event_, events.NeighbourChanged) and event_.index == wifi_index and state.network \
                and not state.network.complete and event_.address == state.network.gateway:
            self.schedule(0.0)  # the host resolved the gateway: its MAC completes the network

    def schedule(self, delay: float) -> None:
        self.check_at = time.monotonic() + delay

    def due(self) -> float | None:
        dues = [t for t in (self.check_at, self.up_at, self.hook_poll_at) if t is not None]
        return min(dues) if dues else None

    def on_timer(self, now: float, state) -> None:
        if self.up_at is not None and now >= self.up_at:
            self.finish_bounce(state)
        if self.hook_poll_at is not None and now >= self.hook_poll_at:
            self.poll_hook(now)
        if self.check_at is not None and now >= self.check_at:
            self.check_at = None
            self.judge(now, state)

    def judge(self, now: float, state) -> None:
        found = current_network(state)
        if found is None:
            return  # no address yet: decide when the host has one
        known = state.network
        if known is None:
            state.network = found
            event("network", f"on network {found.describe()}", subnet=found.subnet, gateway=found.gateway,
                  gateway_mac=found.gateway_mac, ssid=found.ssid)
            state.post(events.NetworkIdentified(found))
        elif found.same_as(known) is False:
            self.undecided_since = None
            self.change(state, known, found)
            return
        elif found.gateway_mac is None and known.gateway_mac is not None and self.wait_for_more(now):
            return  # the host has not resolved this network's gateway yet: is it the same router?
        else:
            self.undecided_since = None
            merged = Network(known.subnet, known.gateway or found.gateway, known.gateway_mac or found.gateway_mac,
                             found.ssid)
            if merged.ssid != known.ssid and known.ssid:
                log.info("now on '%s', the same network as '%s' (%s)", merged.ssid, known.ssid, merged.subnet)
            state.network = merged

    def wait_for_more(self, now: float) -> bool:
        """Judge again soon, for a while, when the host has not resolved all of its network yet."""
        self.undecided_since = self.undecided_since or now
        if now - self.undecided_since < GATEWAY_MAC_WAIT:
            self.schedule(SETTLE)
            return True
        return False

    def change(self, state, old: Network, new: Network) -> None:
        flushed = self.flush(state)
        state.network = new
        event("network_changed", f"new network: {new.describe()}, was {old.describe()}: "
              f"forgot {flushed['bindings']} bindings and {flushed['lan_macs']} LAN MACs",
              level=logging.WARNING, old=old.describe(), new=new.describe(), **flushed)
        state.post(events.NetworkChanged(old, new))
        self.tell_vms(state, new)

    @staticmethod
    def flush(state) -> dict[str, int]:
        maps = state.maps
        bindings = 0
        for key, binding in maps.bindings.items():
            if not binding.flags & constants.BINDING_STATIC:
                bindings += maps.bindings.delete(key)
        lan_macs = sum(maps.lan_macs.delete(key) for key in list(maps.lan_macs.keys()))
        maps.lan_addrs.clear()   # the old LAN's hosts and gateways (the new gateways are pinned again)
        maps.refusals.clear()
        return {"bindings": bindings, "lan_macs": lan_macs}

    # ---- telling the VMs --------------------------------------------------------------------
    def tell_vms(self, state, network: Network) -> None:
        action = state.settings.network_change
        if action == "nothing" or state.bridge is None:
            return
        ports = [p for p in netlink.bridge_ports(state.ipr, state.bridge.index)
                 if state.uplink is None or p.index != state.uplink.index]
        bounce = [p for p in ports if action == "bounce" and p.kind == "veth" and p.peer_elsewhere]
        others = [p for p in ports if p not in bounce]
        for port in bounce:
            state.ipr.link("set", index=port.index, state="down")
        if bounce:
            self.bounced = bounce
            self.up_at = time.monotonic() + BOUNCE_DOWN
            log.info("bouncing the carrier of %s so the VMs ask for new addresses",
                     ", ".join(p.name for p in bounce))
        if others:
            self.run_hook(state, network, others)

    def finish_bounce(self, state) -> None:
        for port in self.bounced:
            try:
                state.ipr.link("set", index=port.index, state="up")
            except Exception as exc:  # the port went away meanwhile
                log.debug("could not bring %s up again: %s", port.name, exc)
        self.bounced, self.up_at = [], None

    def run_hook(self, state, network: Network, ports: list[netlink.Link]) -> None:
        hook = state.settings.network_change_hook
        names = [p.name for p in ports]
        if not hook:
            log.warning("the VMs on %s were not told of the new network (set network_change.hook to a "
                        "program that relinks them, e.g. /usr/share/macnat/hooks/proxmox-relink)", ", ".join(names))
            return
        if self.hook is not None and self.hook.poll() is None:
            log.warning("the previous network-change hook still runs: killing it")
            self.hook.kill()
        env = {**os.environ, "MACNAT_EVENT": "network-change", "MACNAT_WIFI": state.wifi_name,
               "MACNAT_BRIDGE": state.settings.bridge, "MACNAT_NETWORK": network.describe(),
               "MACNAT_SUBNET": network.subnet or "", "MACNAT_PORTS": " ".join(names)}
        try:
            self.hook = subprocess.Popen([hook, *names], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            log.error("cannot run the network-change hook %s: %s", hook, exc)
            self.hook = None
            return
        self.hook_deadline = time.monotonic() + HOOK_TIMEOUT
        self.hook_poll_at = time.monotonic() + 0.2
        log.info("running %s for %s", hook, ", ".join(names))

    def poll_hook(self, now: float) -> None:
        status = self.hook.poll()
        if status is None:
            if now < self.hook_deadline:
                self.hook_poll_at = now + 0.5
                return
            self.hook.kill()
            status = self.hook.wait()
            log.error("the network-change hook took longer than %.0f s: killed", HOOK_TIMEOUT)
        output = self.hook.stdout.read().strip()
        self.hook.stdout.close()
        level = logging.INFO if status == 0 else logging.ERROR
        log.log(level, "the network-change hook exited %d%s", status, f": {output}" if output else "")
        self.hook, self.hook_poll_at = None, None

    def close(self) -> None:
        if self.hook is not None and self.hook.poll() is None:
            self.hook.kill()
