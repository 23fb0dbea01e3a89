"""Every number the datapath and the manager share, in one place; cflags() hands them to the C code."""

from __future__ import annotations

# Per-CPU counters, by index. The C code names them MACNAT_CNT_<UPPER NAME>. An event's kind is the
# index of the counter it goes with, so the events and the counters share one vocabulary.
COUNTERS: dict[str, str] = {
    "vm_to_wifi": "VM frames translated and sent out the Wi-Fi interface",
    "wifi_to_vm": "unicast from Wi-Fi translated and delivered to a VM",
    "vm_to_host": "VM frames delivered to the host's own stack",
    "host_to_vm": "host frames delivered to a VM",
    "group_to_vms": "broadcast/multicast from Wi-Fi or the host copied to the VMs",
    "group_restored": "group frames an AP delivered as unicast, restored to their group address",
    "dhcp_flag_set": "DHCP requests given the broadcast flag",
    "dhcp_rewritten": "VM DHCP messages sent with the Wi-Fi MAC as chaddr (dhcp = rewrite), told apart by their client "
                      "identifier",
    "dhcp_client_id_added": "of those, messages without a client identifier that got one made of the VM's MAC "
                            "(option 61, type 1)",
    "dhcp_not_rewritten": "VM DHCP messages left with their own chaddr under dhcp = rewrite: BOOTP without DHCP options, "
                          "no room for a client identifier (no END option, a trailer, too long), or an xid not "
                          "remembered (the answer could not be given back)",
    "dhcp_reply_restored": "DHCP replies (OFFER, ACK, NAK) to a rewritten message given back to their VM with its "
                           "own chaddr",
    "ndp_rewritten": "NDP link-layer address options of a VM rewritten to the Wi-Fi MAC",
    "wifi_to_host": "Wi-Fi frames passed to the host untouched",
    "learned_mac": "new VM MACs learned (each on the bridge port it was first seen on)",
    "learned_ip": "new VM address bindings learned (IPv4 and IPv6)",
    "learned_lan_mac": "new LAN host MACs noted (from the LAN's ARP and NDP), for the bridge's FDB",
    "moved_ip": "bindings moved to another VM by a DHCPACK answering that VM's own request",
    "dad_conflict": "LAN hosts probing (DAD) an address bound to a VM: the binding is dropped until the VM defends it",
    "refused_host_ip": "VM frames dropped: they claim an address of the host (a DAD probe goes on, for the host to answer)",
    "refused_static": "VM frames dropped: they claim another VM's static address",
    "refused_claim": "VM frames dropped: they claim an address bound to another VM (the manager probes the owner)",
    "refused_lan_ip": "VM frames dropped: they claim an address the LAN uses (the gateway's, or seen in its ARP/NDP)",
    "refused_address": "VM frames dropped: their source is no address a VM may have (loopback, group, reserved, "
                       "link-local IPv4, documentation, IPv4-mapped IPv6, off-link)",
    "refused_mac_port": "VM frames dropped: their source MAC belongs to another bridge port (port security)",
    "refused_mac_wifi": "VM frames dropped: their source MAC is the Wi-Fi interface's own",
    "refused_mac_lan": "VM frames dropped: their source MAC is a LAN host's",
    "refused_limit_macs": "VM frames dropped: their port is at its limit of MACs (what it has stays)",
    "refused_limit_ipv4": "VM frames dropped: their port is at its limit of IPv4 addresses (what it has stays)",
    "refused_limit_ipv6": "VM frames dropped: their port is at its limit of IPv6 addresses (what it has stays)",
    "dhcp_untracked": "VM DHCP requests forwarded but not remembered (port at its limit, or the xid is another VM's)",
    "dhcp_ack_unmatched": "DHCPACKs from Wi-Fi that answer no recent request of that VM (xid, chaddr): nothing bound",
    "drop_dhcp_host_address": "DHCP offers and ACKs for a VM's rewritten request that hand it this host's own address "
                              "(a server that took the VM for this host: it ignores option 61, or matches this "
                              "host's lease by chaddr), dropped",
    "pppoe_to_vm": "PPPoE frames from Wi-Fi given to the VM that does PPPoE (one VM at a time)",
    "refused_pppoe": "VM PPPoE frames dropped: another VM's PPPoE is active (one VM at a time)",
    "lan_ip_conflict": "LAN ARP/NDP using an address bound to a VM (the binding stays; the LAN's use is noted)",
    "drop_echo": "frames macnat injected into the bridge, flooded back to the uplink and dropped",
    "drop_vm_to_vm": "frames between VMs flooded to the uplink, dropped (the bridge delivers them)",
    "drop_malformed": "VM frames dropped as truncated or malformed (ARP other than an Ethernet/IPv4 request or reply, "
                      "NDP that is fragmented or has bad options, lengths beyond the frame)",
    "drop_vlan": "VLAN-tagged VM frames dropped (802.1Q, QinQ, or a vlan-aware bridge's tag)",
    "drop_llc": "802.3/LLC VM frames dropped (an AP turns a SNAP payload into Ethernet II with the VM's MAC inside)",
    "drop_link_local": "VM frames for the IEEE 802.1 link-local groups (01:80:c2:00:00:0x: STP, LACP, 802.1X) or LLDP "
                       "dropped: they describe the VM's own link, which ends at the bridge",
    "drop_station_control": "VM frames of a station's own control protocols dropped (EAPOL, RSN pre-authentication, "
                            "802.11 TDLS/FT encapsulation): the AP would take them for the station's",
    "drop_ethertype": "VM frames of other EtherTypes dropped (IPX, AppleTalk, AoE, ...): their replies would come to "
                      "the station's MAC with nothing to tell which VM they are for",
    "drop_table_full": "VM frames dropped because a table is full",
    "events_suppressed": "events not sent to the manager: their port exceeded its event rate",
    "events_lost": "events lost: the ring buffer to the manager was full",
}
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}

MAX_BINDINGS = 65536
MAX_VM_MACS = 4096
MAX_LAN_MACS = 4096
MAX_LAN_ADDRS = 4096
MAX_HOST_ADDRS = 256
MAX_REFUSALS = 256
MAX_PORTS = 1024            # bridge ports with per-port state (ports, port_released)
MAX_ONLINK_PREFIXES = 256
MAX_DHCP_REQUESTS = 1024
VM_HINT_SLOTS = 4096        # a cheap "certainly not a VM MAC" before the vm_macs lookup
EVENT_RING_BYTES = 64 * 1024  # the events ring buffer (a power of two, at least a page)

# Per-port limits (config fields max_*_per_port override them; 0 there means these defaults). They fit
# a VM with several NICs' worth of MACs, and IPv6 privacy addresses rotating for days.
PORT_MAX_MACS = 32
PORT_MAX_IPV4 = 64
PORT_MAX_IPV6 = 128
PORT_MAX_DHCP_REQUESTS = 16
PORT_EVENTS_PER_SECOND = 20   # learning events, and as many others, a port may send the manager per second
# What each port's learned/released counts count, by index (struct port_counts in bpf/macnat.h).
PORT_COUNTS = ("macs", "ipv4", "ipv6", "dhcp_requests")

DHCP_REQUEST_TTL_S = 60     # a DHCPACK binds at once only if it answers a request at most this old
DHCP_REWRITTEN = 1          # dhcp_requests flags: the request left with the Wi-Fi MAC as chaddr
DHCP_CLIENT_ID_ADDED = 2    # ... and with a client identifier macnat added (the server's echo is taken out again)
PPPOE_IDLE_S = 60           # a VM's PPPoE silent this long lets another VM start one

BINDING_STATIC = 1          # set by the user; never aged, never moved by learning
LAN_PINNED = 1              # lan_macs / lan_addrs: put there by the manager (the gateway); never aged
CFG_CREATED_CLSACT = 1      # the loader created wifi's clsact qdisc, so detach may remove it
CFG_ONLINK_IPV4 = 2         # the manager knows the on-link IPv4 prefixes: VM IPv4 addresses must be in onlink
CFG_ONLINK_IPV6 = 4         # the same for IPv6 (fe80::/10 is always on-link)
CFG_ALLOW_IPV4_LINK_LOCAL = 8   # VMs may use 169.254.0.0/16 (RFC 3927)
CFG_ALLOW_DOCUMENTATION = 16    # VMs may use the documentation prefixes (RFC 5737, RFC 3849, RFC 9637)
CFG_DHCP_REWRITE = 32       # VMs' DHCP leaves with the Wi-Fi MAC as chaddr (the dhcp policy: rewrite, or auto decided so)

# cls_bpf filters: an explicit priority and handle, so macnat finds and removes only its own.
TC_PRIO = 0x40DE  # an unusual priority: other tools sharing the clsact keep theirs
TC_HANDLE = 0x1
# The skb->mark bit uplink_egress sets on a VM's frame it redirects to wlan0, so that wlan0's own egress
# program, which the redirect runs again, passes it at once instead of looking it over as a frame of the
# host's. One bit, so the rest of a mark survives (and a qdisc on wlan0 may shape the VMs' traffic by
# it); a bit the usual markers (WireGuard 0xca6c, Tailscale 0xff0000, kube-proxy 0xc000) leave alone.
MARK_FROM_VMS = 0x10000000
PROGRAMS = {  # function in bpf/macnat.c -> (device role, hook)
    "wifi_ingress": ("wifi", "ingress"),
    "wifi_egress": ("wifi", "egress"),
    "uplink_egress": ("uplink", "egress"),
}
MAP_NAMES = ("config", "counters", "bindings", "vm_macs", "vm_hints", "lan_macs", "lan_addrs", "host_addrs",
             "refusals", "onlink", "dhcp_requests", "ports", "port_released", "pppoe", "events")


def cflags() -> list[str]:
    flags = {
        "MACNAT_NUM_COUNTERS": len(COUNTERS),
        "MACNAT_MAX_BINDINGS": MAX_BINDINGS,
        "MACNAT_MAX_VM_MACS": MAX_VM_MACS,
        "MACNAT_MAX_LAN_MACS": MAX_LAN_MACS,
        "MACNAT_MAX_LAN_ADDRS": MAX_LAN_ADDRS,
        "MACNAT_MAX_HOST_ADDRS": MAX_HOST_ADDRS,
        "MACNAT_MAX_REFUSALS": MAX_REFUSALS,
        "MACNAT_MAX_PORTS": MAX_PORTS,
        "MACNAT_MAX_ONLINK_PREFIXES": MAX_ONLINK_PREFIXES,
        "MACNAT_MAX_DHCP_REQUESTS": MAX_DHCP_REQUESTS,
        "MACNAT_VM_HINT_SLOTS": VM_HINT_SLOTS,
        "MACNAT_EVENT_RING_BYTES": EVENT_RING_BYTES,
        "MACNAT_PORT_MAX_MACS": PORT_MAX_MACS,
        "MACNAT_PORT_MAX_IPV4": PORT_MAX_IPV4,
        "MACNAT_PORT_MAX_IPV6": PORT_MAX_IPV6,
        "MACNAT_PORT_MAX_DHCP_REQUESTS": PORT_MAX_DHCP_REQUESTS,
        "MACNAT_PORT_EVENTS_PER_SECOND": PORT_EVENTS_PER_SECOND,
        "MACNAT_NUM_PORT_COUNTS": len(PORT_COUNTS),
        "MACNAT_DHCP_REQUEST_TTL_NS": DHCP_REQUEST_TTL_S * 10**9,
        "MACNAT_DHCP_REWRITTEN": DHCP_REWRITTEN,
        "MACNAT_DHCP_CLIENT_ID_ADDED": DHCP_CLIENT_ID_ADDED,
        "MACNAT_PPPOE_IDLE_NS": PPPOE_IDLE_S * 10**9,
        "MACNAT_BINDING_STATIC": BINDING_STATIC,
        "MACNAT_LAN_PINNED": LAN_PINNED,
        "MACNAT_CFG_CREATED_CLSACT": CFG_CREATED_CLSACT,
        "MACNAT_CFG_ONLINK_IPV4": CFG_ONLINK_IPV4,
        "MACNAT_CFG_ONLINK_IPV6": CFG_ONLINK_IPV6,
        "MACNAT_CFG_ALLOW_IPV4_LINK_LOCAL": CFG_ALLOW_IPV4_LINK_LOCAL,
        "MACNAT_CFG_ALLOW_DOCUMENTATION": CFG_ALLOW_DOCUMENTATION,
        "MACNAT_CFG_DHCP_REWRITE": CFG_DHCP_REWRITE,
        "MACNAT_MARK_FROM_VMS": MARK_FROM_VMS,
    }
    flags.update({f"MACNAT_PORT_{name.upper()}": i for i, name in enumerate(PORT_COUNTS)})
    flags.update({f"MACNAT_CNT_{name.upper()}": i for name, i in COUNTER_INDEX.items()})
    return [f"-D{name}={value}" for name, value in flags.items()]
