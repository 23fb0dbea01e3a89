"""Unicast probes of a VM's address, from the Wi-Fi interface's MAC and addresses, sent into the
bridge: an ARP request for IPv4, a neighbour solicitation for IPv6 (power-saving clients ignore
broadcast probes). The VM's answer reaches uplink_egress and refreshes its binding."""

from __future__ import annotations

import logging
import socket

from macnat import frames, netlink

log = logging.getLogger("macnat")


class Prober:
    """A packet socket into the bridge (opened again when the bridge is re-created)."""

    def __init__(self):
        self.socket: socket.socket | None = None
        self.bridge: int | None = None

    def source(self, state) -> tuple[bytes, bytes, bytes | None]:
        """What probes come from: the Wi-Fi's MAC, its IPv4 (0.0.0.0 if none) and IPv6 link-local address."""
        index = state.wifi.index
        ipv4 = netlink.interface_address(state.ipr, index, socket.AF_INET) or "0.0.0.0"
        ipv6 = netlink.interface_address(state.ipr, index, socket.AF_INET6, link_local=True)
        return (bytes(state.maps.current_config().wifi_mac), socket.inet_aton(ipv4),
                socket.inet_pton(socket.AF_INET6, ipv6) if ipv6 else None)

    def probe(self, state, ip: str, vm_mac: bytes, source=None) -> bool:
        """Send one probe for `ip` to `vm_mac`; False when it could not be sent."""
        if state.wifi is None or state.bridge is None:
            return False
        mac, ipv4, ipv6 = source or self.source(state)
        if ":" in ip:
            if ipv6 is None:
                log.debug("cannot probe %s: %s has no IPv6 link-local address", ip, state.wifi_name)
                return False
            frame = frames.neighbour_solicitation(vm_mac, mac, ipv6, socket.inet_pton(socket.AF_INET6, ip))
        else:
            frame = frames.arp(vm_mac, mac, ipv4, socket.inet_aton(ip))
        try:
            if self.socket is None or self.bridge != state.bridge.index:
                self.close()
                self.socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                self.socket.bind((state.bridge.name, 0))
                self.bridge = state.bridge.index
            self.socket.send(frame)
        except OSError as exc:
            log.warning("could not probe %s: %s", ip, exc)
            return False
        return True

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
