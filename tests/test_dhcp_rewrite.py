"""The DHCPv4 policies at packet level (BPF_PROG_TEST_RUN in macnat.harness's namespace): `rewrite` sends
a VM's DHCP with the Wi-Fi MAC as chaddr and the VM's client identifier (its own, or one added before
END: the frame grows by 9 bytes), and gives the server's answers back to the right VM by xid, broadcast
or unicast, with its chaddr restored; `keep` leaves chaddr alone. Each output is compared byte for byte
with the frame scapy builds for what it must be, lengths and checksums recomputed by scapy."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from scapy.all import BOOTP, DHCP, IP, UDP, Ether, Raw

from macnat import config, constants, maps, netns
from macnat.harness import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VM_PORT, Harness
from macnat.manager import events
from macnat.clock import monotonic_ns
from macnat.manager.duties.dhcp_policy import DhcpPolicy
from macnat.manager.duties.network_change import Network
from macnat.manager.state import State
from macnat.maps import DhcpRequest, ip_key, mac_bytes, xid_key
from macnat.netlink import Link
from test_datapath import Sniffer

WIFI_MAC, VM_MAC, VM2_MAC, SERVER_MAC = "02:4d:4e:00:00:0a", "52:54:00:00:01:01", "52:54:00:00:01:02", \
    "02:4d:4e:00:00:01"
HOST_IP, SERVER_IP, VM_IP, VM2_IP = "192.168.77.10", "192.168.77.1", "192.168.77.101", "192.168.77.102"
PORT2 = VM_PORT + 1
BROADCAST = "ff:ff:ff:ff:ff:ff"
XID, XID2 = 0x1234, 0x5678
REWRITE = constants.CFG_DHCP_REWRITE


def client_id(mac: str) -> tuple[str, bytes]:
    """Option 61 as macnat adds it: hardware type 1 (Ethernet) and the MAC (RFC 2132 9.14)."""
    return "client_id", b"\x01" + bytes(mac_bytes(mac))


def request(message: str = "discover", mac: str = VM_MAC, chaddr: str | None = None, xid: int = XID,
            options=(), padding: int = 0, ip_src: str = "0.0.0.0", ip_dst: str = "255.255.255.255",
            dst: str = BROADCAST, flags: int = 0x8000, chksum: int | None = None, trailer: bytes = b"") -> bytes:
    """A VM's DHCP message; `padding` zero bytes after END (ISC dhclient pads to 300 bytes of BOOTP)."""
    udp = UDP(sport=68, dport=67) if chksum is None else UDP(sport=68, dport=67, chksum=chksum)
    frame = (Ether(src=mac, dst=dst) / IP(src=ip_src, dst=ip_dst, id=7) / udp
             / BOOTP(op=1, chaddr=mac_bytes(chaddr or mac), xid=xid, flags=flags, ciaddr=ip_src)
             / DHCP(options=[("message-type", message), *options, "end"]) / Raw(bytes(padding)))
    return bytes(frame) + trailer


def reply(message: str = "offer", chaddr: str = WIFI_MAC, xid: int = XID, yiaddr: str = VM_IP, options=(),
          dst: str = BROADCAST, ip_dst: str = "255.255.255.255", padding: int = 0) -> bytes:
    return bytes(Ether(src=SERVER_MAC, dst=dst) / IP(src=SERVER_IP, dst=ip_dst, id=9) / UDP(sport=67, dport=68)
                 / BOOTP(op=2, yiaddr=yiaddr if message != "nak" else "0.0.0.0", chaddr=mac_bytes(chaddr), xid=xid,
                         flags=0x8000)
                 / DHCP(options=[("message-type", message), ("server_id", SERVER_IP), *options, "end"])
                 / Raw(bytes(padding)))


@pytest.fixture(scope="module")
def harness():
    h = Harness(f"{netns.PREFIX}test-dhcp", WIFI_MAC)
    yield h
    h.close()


@pytest.fixture
def rewrite(harness):
    harness.set_wifi_mac(WIFI_MAC, flags=REWRITE)
    harness.reset(host_addresses=(HOST_IP,))
    return harness


@pytest.fixture
def keep(harness):
    harness.set_wifi_mac(WIFI_MAC)
    harness.reset(host_addresses=(HOST_IP,))
    return harness


def pending(h: Harness, xid: int = XID) -> DhcpRequest | None:
    return h.maps.dhcp_requests.lookup(xid_key(xid))


def from_vm(h: Harness, frame: bytes, port: int = VM_PORT):
    return h.run("uplink_egress", frame, port)


# ---- out: the VM's messages -------------------------------------------------------------------

@pytest.mark.parametrize("padding", [0, 1, 8, 9, 60], ids=lambda p: f"padding-{p}")
@pytest.mark.parametrize("odd", [False, True], ids=["end-even", "end-odd"])
def test_a_request_without_client_id_gets_the_vms_and_the_wifi_mac(rewrite, padding, odd):
    """chaddr becomes the Wi-Fi MAC and option 61 (type 1, the VM's MAC) goes in before END: 9 bytes more,
    the padding after END kept, IPv4 total length, UDP length and both checksums as scapy computes them."""
    options = [("hostname", b"vm1" if odd else b"vm-1"), ("param_req_list", [1, 3, 6])]
    frame = request(options=options, padding=padding)
    run = from_vm(rewrite, frame)
    assert run.retval == TC_ACT_REDIRECT
    assert run.moved == {"vm_to_wifi": 1, "learned_mac": 1, "dhcp_rewritten": 1, "dhcp_client_id_added": 1}
    # what a client with this client identifier, sending from the Wi-Fi MAC, would have sent
    assert run.data == request(options=[*options, client_id(VM_MAC)], padding=padding, chaddr=WIFI_MAC, mac=WIFI_MAC)
    out = Ether(run.data)
    assert len(run.data) == len(frame) + 9
    assert (out[IP].len, out[UDP].len) == (len(frame) - 14 + 9, len(frame) - 34 + 9)
    assert dict(o for o in out[DHCP].options if isinstance(o, tuple))["client_id"] == b"\x01" + bytes(mac_bytes(VM_MAC))
    sent = pending(rewrite)
    assert (maps.mac_str(sent.mac), sent.port, sent.flags, sent.message, sent.requests, sent.replies) == \
        (VM_MAC, VM_PORT, constants.DHCP_REWRITTEN | constants.DHCP_CLIENT_ID_ADDED, 1, 1, 0)


@pytest.mark.parametrize("message", ["discover", "request", "decline", "release", "inform"])
def test_a_vms_own_client_id_stays_and_only_chaddr_changes(rewrite, message):
    """With the VM's own option 61 nothing grows: chaddr and the UDP checksum are the only bytes that
    change (and the broadcast flag, which every request gets)."""
    own = ("client_id", b"\xff\x00\x00\x00\x01\x00\x01\x2d\x3c")  # dhcpcd's default: an RFC 4361 DUID
    ciaddr = VM_IP if message in ("release", "inform") else "0.0.0.0"
    if ciaddr != "0.0.0.0":
        rewrite.bind(VM_IP, VM_MAC)
    frame = request(message, options=[own], ip_src=ciaddr, flags=0)
    run = from_vm(rewrite, frame)
    assert run.retval == TC_ACT_REDIRECT and run.moved["dhcp_rewritten"] == 1
    assert "dhcp_client_id_added" not in run.moved
    assert run.data == request(message, options=[own], ip_src=ciaddr, chaddr=WIFI_MAC, mac=WIFI_MAC)
    assert pending(rewrite).flags == constants.DHCP_REWRITTEN


def test_keep_leaves_chaddr_alone(keep):
    frame = request(options=[("hostname", b"vm1")], flags=0)
    run = from_vm(keep, frame)
    assert run.retval == TC_ACT_REDIRECT and "dhcp_rewritten" not in run.moved and "dhcp_not_rewritten" not in run.moved
    assert run.data == request(options=[("hostname", b"vm1")]).replace(
        bytes(mac_bytes(VM_MAC)), bytes(mac_bytes(WIFI_MAC)), 1)  # the Ethernet source, and the broadcast flag
    assert Ether(run.data)[BOOTP].chaddr[:6] == bytes(mac_bytes(VM_MAC))
    assert pending(keep).flags == 0


def test_a_zero_udp_checksum_stays_zero_when_the_frame_grows(rewrite):
    run = from_vm(rewrite, request(chksum=0, padding=4))
    assert run.retval == TC_ACT_REDIRECT and run.moved["dhcp_client_id_added"] == 1
    out = Ether(run.data)
    assert out[UDP].chksum == 0 and bytes(out[BOOTP].chaddr)[:6] == bytes(mac_bytes(WIFI_MAC))
    ip = out[IP].copy()
    del ip.chksum
    assert out[IP].chksum == IP(bytes(ip))[IP].chksum


@pytest.mark.parametrize("frame, why", [
    (bytes(Ether(src=VM_MAC, dst=BROADCAST) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
           / BOOTP(op=1, chaddr=mac_bytes(VM_MAC), xid=XID) / Raw(bytes(64))), "bootp"),
    (request(trailer=b"\x00" * 6), "trailer"),
    (request(chaddr="52:54:00:aa:bb:cc"), "another-chaddr"),
    (request(options=[("hostname", b"x" * 200)] * 6 + [("hostname", b"x" * 10)]), "past-an-mtu"),  # IP 1496 + 9
], ids=lambda v: v if isinstance(v, str) else "")
def test_what_cannot_be_rewritten_leaves_as_it_came(rewrite, frame, why):
    """BOOTP (chaddr is its only identity), a frame with a trailer after the datagram or no room within an
    MTU for a client identifier, a client that is not the VM: with the Wi-Fi MAC as chaddr and no client
    identifier the server would take it for this host, so it keeps its chaddr (counted)."""
    run = from_vm(rewrite, frame)
    assert run.retval == TC_ACT_REDIRECT and run.moved["dhcp_not_rewritten"] == 1
    assert "dhcp_rewritten" not in run.moved and len(run.data) == len(frame)
    assert Ether(run.data)[BOOTP].chaddr[:6] == frame[14 + 20 + 8 + 28:][:6]


def test_a_request_with_a_trailer_and_its_own_client_id_is_rewritten(rewrite):
    frame = request(options=[client_id(VM_MAC)], trailer=b"\xaa" * 6)
    run = from_vm(rewrite, frame)
    assert run.moved["dhcp_rewritten"] == 1 and run.data[-6:] == b"\xaa" * 6 and len(run.data) == len(frame)


def test_another_vms_xid_is_neither_remembered_nor_rewritten(rewrite):
    """A VM that copies another's xid (it sees their broadcasts) must not get their answers: its request
    leaves unrewritten, so a reply to the Wi-Fi's chaddr can only be the first VM's."""
    from_vm(rewrite, request(mac=VM2_MAC), PORT2)
    run = from_vm(rewrite, request())
    assert run.moved["dhcp_untracked"] == 1 and run.moved["dhcp_not_rewritten"] == 1
    assert Ether(run.data)[BOOTP].chaddr[:6] == bytes(mac_bytes(VM_MAC))
    assert maps.mac_str(pending(rewrite).mac) == VM2_MAC


def test_retransmissions_are_counted_and_replies_too(rewrite):
    for _ in range(3):
        from_vm(rewrite, request())
    assert (pending(rewrite).requests, pending(rewrite).replies) == (3, 0)
    rewrite.run("wifi_ingress", reply("offer", options=[client_id(VM_MAC)]))
    assert pending(rewrite).replies == 1


# ---- in: the server's answers -----------------------------------------------------------------

@pytest.mark.parametrize("message", ["offer", "ack", "nak"])
def test_a_broadcast_answer_gets_the_vms_chaddr_back_and_loses_the_client_id_macnat_added(rewrite, message):
    """The server echoes option 61 (RFC 6842); the VM sent none, so the echo becomes PAD options, and
    chaddr is the VM's again: the frame is what a server answering the VM itself would have sent."""
    from_vm(rewrite, request())
    frame = reply(message, options=[client_id(VM_MAC)], padding=3)
    run = rewrite.run("wifi_ingress", frame)
    assert run.retval == TC_ACT_OK
    expected = {"group_to_vms": 1, "dhcp_reply_restored": 1, **({"learned_ip": 1} if message == "ack" else {})}
    assert run.moved == expected
    assert run.data == reply(message, chaddr=VM_MAC, options=["pad"] * 9, padding=3)
    if message == "ack":
        b = rewrite.binding(VM_IP)
        assert (maps.mac_str(b.mac), b.port) == (VM_MAC, VM_PORT)


def test_a_vms_own_client_id_stays_in_the_answer(rewrite):
    own = ("client_id", b"\xff\x00\x00\x00\x01\x00\x01\x2d\x3c")
    from_vm(rewrite, request(options=[own]))
    run = rewrite.run("wifi_ingress", reply("ack", options=[own]))
    assert run.data == reply("ack", chaddr=VM_MAC, options=[own])


def test_unicast_answers_go_to_their_vm(rewrite):
    """A server that ignores the broadcast flag answers at yiaddr to chaddr (the station's MAC); renewals
    and rebinds are answered at the VM's address: each reply goes to the VM whose xid it carries, as
    unicast to its MAC, chaddr restored, whether the address is bound yet or not."""
    from_vm(rewrite, request())
    from_vm(rewrite, request(mac=VM2_MAC, xid=XID2), PORT2)
    for xid, vm, ip in ((XID, VM_MAC, VM_IP), (XID2, VM2_MAC, VM2_IP)):
        run = rewrite.run("wifi_ingress", reply("offer", xid=xid, yiaddr=ip, dst=WIFI_MAC, ip_dst=ip,
                                                options=[client_id(vm)]))
        assert run.retval == TC_ACT_REDIRECT and run.moved == {"wifi_to_vm": 1, "dhcp_reply_restored": 1}
        assert run.data == reply("offer", xid=xid, yiaddr=ip, chaddr=vm, dst=vm, ip_dst=ip, options=["pad"] * 9)
    # renewing: unicast from the VM's address to the server, answered at that address
    rewrite.bind(VM_IP, VM_MAC)
    from_vm(rewrite, request("request", xid=0x4242, ip_src=VM_IP, ip_dst=SERVER_IP, dst=SERVER_MAC, flags=0))
    run = rewrite.run("wifi_ingress", reply("ack", xid=0x4242, dst=WIFI_MAC, ip_dst=VM_IP, options=[client_id(VM_MAC)]))
    assert run.retval == TC_ACT_REDIRECT and run.moved == {"wifi_to_vm": 1, "dhcp_reply_restored": 1}
    assert Ether(run.data).dst == VM_MAC and Ether(run.data)[BOOTP].chaddr[:6] == bytes(mac_bytes(VM_MAC))


def test_an_answer_handing_a_vm_this_hosts_address_is_dropped(rewrite):
    """A server that ignores option 61 (or matches this host's client-id-less lease by chaddr, as
    dnsmasq does) takes the VM for this host: the VM must not configure the host's address."""
    from_vm(rewrite, request())
    run = rewrite.run("wifi_ingress", reply("offer", yiaddr=HOST_IP))
    assert run.retval == TC_ACT_SHOT and run.moved == {"drop_dhcp_host_address": 1}


def test_keep_answers_unicast_to_the_station_reach_their_vm_and_count(keep):
    """With keep, a renewal's ACK at the VM's address comes with the VM's chaddr: it goes to the VM and
    counts as an answer (dhcp = auto must not take it for a silent server)."""
    keep.bind(VM_IP, VM_MAC)
    from_vm(keep, request("request", ip_src=VM_IP, ip_dst=SERVER_IP, dst=SERVER_MAC, flags=0))
    frame = reply("ack", chaddr=VM_MAC, dst=WIFI_MAC, ip_dst=VM_IP)
    run = keep.run("wifi_ingress", frame)
    assert run.retval == TC_ACT_REDIRECT and run.moved == {"wifi_to_vm": 1}
    assert run.data == bytes(mac_bytes(VM_MAC)) + frame[6:]
    assert pending(keep).replies == 1


def test_an_answer_to_the_wifi_mac_for_a_kept_request_is_not_given_to_the_vm(rewrite):
    """Only a request that left rewritten has its answers at the Wi-Fi's chaddr."""
    rewrite.set_wifi_mac(WIFI_MAC)  # keep
    from_vm(rewrite, request())
    rewrite.set_wifi_mac(WIFI_MAC, flags=REWRITE)
    run = rewrite.run("wifi_ingress", reply("offer"))
    assert run.moved == {"group_to_vms": 1} and run.data == reply("offer")


def test_the_hosts_own_requests_are_its_own(rewrite):
    """The host's broadcast DISCOVER (seen by wifi_egress) is remembered as the host's: its answers stay
    untouched, and a VM that copies its xid is not remembered, so it cannot take them."""
    host = request(mac=WIFI_MAC, xid=0x7777)
    run = rewrite.run("wifi_egress", host)
    assert run.retval == TC_ACT_OK and run.moved == {"group_to_vms": 1}
    entry = pending(rewrite, 0x7777)
    assert (maps.mac_str(entry.mac), entry.port, entry.requests) == (WIFI_MAC, 0, 1)
    thief = from_vm(rewrite, request(xid=0x7777))
    assert thief.moved["dhcp_untracked"] == 1 and thief.moved["dhcp_not_rewritten"] == 1
    answer = reply("offer", xid=0x7777, yiaddr=HOST_IP)
    run = rewrite.run("wifi_ingress", answer)
    assert run.retval == TC_ACT_OK and run.data == answer and run.moved == {"group_to_vms": 1}
    assert pending(rewrite, 0x7777).replies == 1
    assert rewrite.binding(HOST_IP) is None


def test_two_vms_leasing_at_once_each_get_their_own(rewrite):
    from_vm(rewrite, request())
    from_vm(rewrite, request(mac=VM2_MAC, xid=XID2), PORT2)
    for xid, vm, ip in ((XID2, VM2_MAC, VM2_IP), (XID, VM_MAC, VM_IP)):
        run = rewrite.run("wifi_ingress", reply("ack", xid=xid, yiaddr=ip, options=[client_id(vm)]))
        assert Ether(run.data)[BOOTP].chaddr[:6] == bytes(mac_bytes(vm))
    assert {maps.mac_str(rewrite.binding(ip).mac): rewrite.binding(ip).port for ip in (VM_IP, VM2_IP)} == \
        {VM_MAC: VM_PORT, VM2_MAC: PORT2}
    assert rewrite.maps.bindings.lookup(ip_key(HOST_IP)) is None


# ---- dhcp = auto: the DhcpPolicy duty over the datapath's own tables ---------------------------

def manager(h: Harness, policy: str) -> tuple[DhcpPolicy, State]:
    """The duty and the manager's shared facts over the harness's maps, attached to wifi0 and br0."""
    resolved = config.resolve("wifi0", {"bridge": "br0", "dhcp": policy}, path=Path("/nonexistent"), environ={})

    class HarnessDatapath:
        maps, programs = h.maps, h.fds

    links = {name: Link(h.ifindex.get(name, 0), name, WIFI_MAC, "veth", None, 1500, up=True, carrier=True)
             for name in ("wifi0", "br0", "up0")}
    links["up0"] = replace(links["up0"], index=socket.if_nametoindex("up0"), master=h.ifindex["br0"])
    state = State("wifi0", resolved, HarnessDatapath(), ipr=None, wifi=links["wifi0"], bridge=links["br0"],
                  uplink=links["up0"])
    duty = DhcpPolicy()
    duty.handle(events.Started(), state)
    return duty, state


def rewriting(h: Harness) -> bool:
    return bool(h.maps.current_config().flags & REWRITE)


def unanswered_discovers(h: Harness, age_s: float = 3.0) -> None:
    """vm1 sent a DISCOVER and its retransmission, the first `age_s` ago, and nothing answered."""
    from_vm(h, request())
    from_vm(h, request())
    backdate(h, age_s)


def backdate(h: Harness, age_s: float) -> None:
    entry = pending(h)
    entry.first_ns = monotonic_ns() - int(age_s * 1e9)
    h.maps.dhcp_requests.update(xid_key(XID), entry)


def test_auto_switches_to_rewrite_when_vms_go_unanswered_and_the_host_is_answered(keep, caplog):
    duty, state = manager(keep, "auto")
    assert not rewriting(keep) and state.dhcp == "auto: keep"
    keep.run("wifi_egress", request(mac=WIFI_MAC, xid=0x7777))            # the host's DHCP client ...
    keep.run("wifi_ingress", reply("ack", xid=0x7777, yiaddr=HOST_IP))    # ... answered
    unanswered_discovers(keep, age_s=1.0)
    duty.run(time.monotonic(), state)
    assert not rewriting(keep), "a second's silence is no proof"
    backdate(keep, 3.0)
    with caplog.at_level(logging.INFO, logger="macnat"):
        duty.run(time.monotonic(), state)
    assert rewriting(keep) and state.dhcp.startswith("auto: rewrite since ")
    assert "2 requests of 1 VM (52:54:00:00:01:01) got no answer in 3.0 s while the server answers this host's own " \
        "requests" in caplog.text
    run = from_vm(keep, request())  # the VM's next retransmission
    assert run.moved["dhcp_rewritten"] == 1
    keep.run("wifi_ingress", reply("ack", options=[client_id(VM_MAC)]))
    with caplog.at_level(logging.INFO, logger="macnat"):
        duty.run(time.monotonic(), state)
    assert "VM 52:54:00:00:01:01 got its answer about 3.0 s after its first request" in caplog.text


def test_auto_asks_the_server_as_the_host_and_keeps_keep_when_nobody_answers(keep, caplog):
    """No request of the host's own to go by: the duty sends a DHCPDISCOVER as the host (chaddr the Wi-Fi
    MAC, no client identifier) and, with no answer to it either, stays with keep."""
    duty, state = manager(keep, "auto")
    unanswered_discovers(keep)
    air = Sniffer("air0")
    try:
        start = time.monotonic()
        duty.run(start, state)
        sent = [Ether(f) for f in air.drain(0.5)]
    finally:
        air.close()
    probe = next(p for p in sent if BOOTP in p)
    assert probe.src == WIFI_MAC and bytes(probe[BOOTP].chaddr)[:6] == bytes(mac_bytes(WIFI_MAC))
    assert probe[DHCP].options[0] == ("message-type", 1) and probe[BOOTP].flags == 0x8000
    assert not any(isinstance(o, tuple) and o[0] == "client_id" for o in probe[DHCP].options)
    with caplog.at_level(logging.INFO, logger="macnat"):
        duty.run(start + 3.5, state)
    assert not rewriting(keep) and "no DHCP server answers on this network; keeping the VMs' chaddr" in caplog.text


def test_auto_leaves_keep_alone_while_the_vms_are_answered(keep):
    duty, state = manager(keep, "auto")
    unanswered_discovers(keep)
    keep.run("wifi_ingress", reply("offer", chaddr=VM_MAC))
    keep.run("wifi_egress", request(mac=WIFI_MAC, xid=0x7777))
    keep.run("wifi_ingress", reply("ack", xid=0x7777, yiaddr=HOST_IP))
    duty.run(time.monotonic(), state)
    assert not rewriting(keep)


def test_auto_goes_back_to_keep_on_a_new_network_and_a_restarted_manager_keeps_its_decision(keep):
    duty, state = manager(keep, "auto")
    keep.run("wifi_egress", request(mac=WIFI_MAC, xid=0x7777))
    keep.run("wifi_ingress", reply("ack", xid=0x7777, yiaddr=HOST_IP))
    unanswered_discovers(keep)
    duty.run(time.monotonic(), state)
    assert rewriting(keep)
    _, restarted = manager(keep, "auto")
    assert rewriting(keep) and restarted.dhcp == "auto: rewrite"
    duty.handle(events.NetworkChanged(None, Network("192.168.88.0/24", "192.168.88.1", None, None)), state)
    assert not rewriting(keep) and state.dhcp == "auto: keep"


@pytest.mark.parametrize("policy, expected", [("keep", False), ("rewrite", True)])
def test_keep_and_rewrite_are_what_the_datapath_does(keep, policy, expected):
    duty, state = manager(keep, policy)
    assert rewriting(keep) is expected and state.dhcp == policy
    new = replace(state.settings, dhcp="keep" if expected else "rewrite")
    state.resolved = replace(state.resolved, settings=new)
    duty.handle(events.Reloaded(replace(new, dhcp=policy), new), state)
    assert rewriting(keep) is not expected
