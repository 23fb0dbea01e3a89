"""ARP requests sent from the host out of the Wi-Fi interface, and who answers them.

An AF_PACKET socket bound to the interface sends each request as a broadcast and collects the replies
for a moment. A reply's sender hardware address tells who answered: a VM answers with its own MAC
(macnat hands it to the host untranslated), a LAN host with its own, and an access point doing proxy
ARP with the station's MAC, on the station's behalf.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

ETH_P_ARP = 0x0806
ARP_REQUEST, ARP_REPLY = 1, 2
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6
ARP_HEADER = struct.Struct("!HHBBH6s4s6s4s")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    """An Ethernet broadcast ARP request: who has target_ip? tell src_ip."""
    sender = mac_bytes(src_mac)
    arp = ARP_HEADER.pack(1, 0x0800, 6, 4, ARP_REQUEST, sender, socket.inet_aton(src_ip), bytes(6),
                          socket.inet_aton(target_ip))
    return BROADCAST + sender + struct.pack("!H", ETH_P_ARP) + arp


@dataclass(frozen=True)
class Reply:
    ip: str          # the address answered for
    mac: str         # the MAC the answer gives for it
    source: str      # the Ethernet source of the frame


def parse_reply(frame: bytes) -> Reply | None:
    if len(frame) < 14 + ARP_HEADER.size or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _, _ = ARP_HEADER.unpack_from(frame, 14)
    if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, ARP_REPLY):
        return None
    return Reply(socket.inet_ntoa(spa), mac_text(sha), mac_text(frame[6:12]))


def ask(ifname: str, src_mac: str, src_ip: str, targets: list[str], wait: float = 1.0) -> dict[str, set[str]]:
    """Send one request for each target and collect, for `wait` seconds, the MACs that answer each."""
    answers: dict[str, set[str]] = {ip: set() for ip in targets}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        for ip in targets:
            sock.send(request(src_mac, src_ip, ip))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                frame, address = sock.recvfrom(2048)
            except TimeoutError:
                break
            reply = parse_reply(frame)
            if address[2] != PACKET_OUTGOING and reply and reply.ip in answers:
                answers[reply.ip].add(reply.mac)
    return answers
