"""The few frames the manager sends itself: unicast ARP and neighbour solicitations (probes of idle VMs),
gratuitous ARP and unsolicited neighbour advertisements (telling the LAN where addresses are), and a
DHCPDISCOVER as the host (dhcp = auto: does the server answer the station's own MAC?)."""

from __future__ import annotations

import struct

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
ICMPV6_NEIGHBOUR_SOLICIT = 135
ICMPV6_NEIGHBOUR_ADVERT = 136
ND_OPT_SOURCE_LL = 1
ND_OPT_TARGET_LL = 2
NA_FLAG_OVERRIDE = 0x20000000
BROADCAST = b"\xff" * 6
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = bytes.fromhex("333300000001")


def arp(dst_mac: bytes, src_mac: bytes, sender_ip: bytes, target_ip: bytes, op: int = 1) -> bytes:
    """An ARP request (op 1) or reply (op 2) for Ethernet and IPv4, padded to the Ethernet minimum."""
    target_mac = dst_mac if op == 2 and dst_mac != BROADCAST else bytes(6)
    frame = (dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + src_mac + sender_ip + target_mac + target_ip)
    return frame.ljust(60, b"\0")


def gratuitous_arp(src_mac: bytes, ip: bytes) -> bytes:
    """A broadcast ARP request announcing `ip` at `src_mac` (RFC 5227 2.3): LAN caches update to it."""
    return arp(BROADCAST, src_mac, ip, ip)


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmpv6(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, icmp: bytes) -> bytes:
    pseudo_header = src_ip + dst_ip + struct.pack("!I3xB", len(icmp), IPPROTO_ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(pseudo_header + icmp)) + icmp[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(icmp), IPPROTO_ICMPV6, 255) + src_ip + dst_ip
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + icmp


def neighbour_solicitation(dst_mac: bytes, src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    """A unicast NS (RFC 4861 7.2.2, as for NUD) to target_ip, with our MAC as source link-layer address."""
    icmp = struct.pack("!BBHI", ICMPV6_NEIGHBOUR_SOLICIT, 0, 0, 0) + target_ip + bytes([ND_OPT_SOURCE_LL, 1]) + src_mac
    return _icmpv6(dst_mac, src_mac, src_ip, target_ip, icmp)


def unsolicited_advertisement(src_mac: bytes, ip: bytes) -> bytes:
    """An unsolicited NA to all nodes (RFC 4861 7.2.6) with the override flag: `ip` is at `src_mac`."""
    icmp = (struct.pack("!BBHI", ICMPV6_NEIGHBOUR_ADVERT, 0, 0, NA_FLAG_OVERRIDE) + ip
            + bytes([ND_OPT_TARGET_LL, 1]) + src_mac)
    return _icmpv6(ALL_NODES_MAC, src_mac, ip, ALL_NODES, icmp)


DHCP_MAGIC_COOKIE = bytes.fromhex("63825363")
BOOTP_MIN_LEN = 300   # RFC 951's size, which servers and relays still expect


def dhcp_discover(src_mac: bytes, xid: int) -> bytes:
    """A broadcast DHCPDISCOVER (RFC 2131) with chaddr `src_mac` and the broadcast flag, without a client
    identifier: what a client that is the station itself sends. It commits the server to nothing."""
    bootp = (struct.pack("!BBBBIHH", 1, 1, 6, 0, xid, 0, 0x8000) + bytes(16) + src_mac + bytes(10) + bytes(192)
             + DHCP_MAGIC_COOKIE + bytes([53, 1, 1, 255]))
    bootp = bootp.ljust(BOOTP_MIN_LEN, b"\0")
    udp_length = 8 + len(bootp)
    source, destination = bytes(4), BROADCAST[:4]
    pseudo_header = source + destination + struct.pack("!BBH", 0, IPPROTO_UDP, udp_length)
    udp = struct.pack("!HHHH", 68, 67, udp_length, 0) + bootp
    udp = udp[:6] + struct.pack("!H", internet_checksum(pseudo_header + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + udp_length, 0, 0, 64, IPPROTO_UDP, 0) + source + destination
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return BROADCAST + src_mac + struct.pack("!H", ETH_P_IP) + ip + udp
