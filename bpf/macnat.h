/* Records shared by the macnat datapath and its manager.
 *
 * The numbers (map sizes, counter indices, flags) come from src/macnat/constants.py as -D cflags;
 * the manager reads these structs through ctypes mirrors in src/macnat/maps.py, which a test checks
 * field by field against the layout bcc compiles from this file.
 */
#ifndef MACNAT_H
#define MACNAT_H

#ifndef MACNAT_NUM_COUNTERS
#error "compile through macnat.loader, which passes the constants from macnat.constants as cflags"
#endif

/* 2-byte aligned (its size stays 6): MACs are compared as three 16-bit words, and the verifier wants
 * every stack access aligned to its size. */
struct mac_addr {
    unsigned char addr[6];
} __attribute__((aligned(2)));

/* An address of either family, as every address map keys it: IPv6, or IPv4 mapped into IPv6 as
 * ::ffff:a.b.c.d (RFC 4291 2.5.5.2), so one table, one learning path and one refusal path serve both. */
struct ip_addr {
    __be32 addr[4];
};

/* config[0]: where this attachment forwards, written by the loader, kept current by the manager (the
 * only writer once attached; the datapath only reads it). Every field added after `flags` works when
 * left at zero: a limit of 0 means the default from constants.py. */
struct macnat_config {
    unsigned char wifi_mac[6];
    __u16 build;              /* the manager's: which source and constants built this datapath */
    __u32 wifi_ifindex;
    __u32 bridge_ifindex;
    __u32 uplink_ifindex;
    __u32 flags;              /* MACNAT_CFG_* */
    __u32 max_macs_per_port;  /* 0: MACNAT_PORT_MAX_MACS */
    __u32 max_ipv4_per_port;  /* 0: MACNAT_PORT_MAX_IPV4 */
    __u32 max_ipv6_per_port;  /* 0: MACNAT_PORT_MAX_IPV6 */
    __u32 max_dhcp_per_port;  /* 0: MACNAT_PORT_MAX_DHCP_REQUESTS */
    __u32 events_per_port;    /* events per second and port; 0: MACNAT_PORT_EVENTS_PER_SECOND */
};

/* bindings: a VM's address -> the VM that owns it, and the bridge port that VM is on. */
struct binding {
    unsigned char mac[6];
    __u16 flags;            /* MACNAT_BINDING_* */
    __u32 port;             /* ifindex of the VM's bridge port; 0 for a static binding not yet used */
    __u32 pad;
    __u64 last_seen_ns;     /* bpf_ktime_get_coarse_ns() of the VM's last frame from this address */
    __u64 tx_packets;       /* VM -> Wi-Fi */
    __u64 tx_bytes;
    __u64 rx_packets;       /* Wi-Fi -> VM */
    __u64 rx_bytes;
};

/* vm_macs: every MAC seen behind the bridge, and the port it belongs to (port security). */
struct vm_mac {
    __u64 last_seen_ns;
    __u32 port;             /* ifindex of its bridge port; 0 for a static VM not seen yet (its first port takes it) */
    __u32 pad;
};

/* lan_macs: MACs of LAN hosts (never a VM's or the Wi-Fi's); lan_addrs: addresses LAN hosts use. */
struct lan_mac {
    __u64 last_seen_ns;
    __u32 flags;            /* MACNAT_LAN_PINNED */
    __u32 pad;
};

struct lan_addr {
    __u64 last_seen_ns;
    unsigned char mac[6];   /* the LAN host seen using it */
    __u16 flags;            /* MACNAT_LAN_PINNED */
};

/* refusals: an address a VM tried to use but may not; for a claim of another VM's address, that
 * VM (the owner), which the manager then probes. */
struct refusal {
    unsigned char mac[6];   /* the VM that claimed it */
    __u16 reason;           /* counter index of the refusal */
    unsigned char owner[6]; /* who has it (a claim of another VM's binding), else zero */
    __u16 pad;
    __u32 port;             /* the claimant's bridge port */
    __u32 pad2;
    __u64 count;
    __u64 last_ns;
};

/* onlink: the on-link prefixes of the Wi-Fi LAN (an LPM trie over the 16-byte keys, IPv4 as /96+n). */
struct onlink_key {
    __u32 prefixlen;
    struct ip_addr addr;
};

struct onlink_prefix {
    __u32 prefixlen;        /* the key's, for the host part (subnet broadcast and network address) */
};

/* dhcp_requests: recent DHCP requests of the VMs, by xid: a DHCPACK binds (or moves) an address at once
 * only when it answers one of them (same xid, and the VM's chaddr or, for a rewritten request, the
 * Wi-Fi's); the VM's MAC and port tell where a reply belongs. The host's own broadcast requests are
 * there too (port 0), so that no VM can take their xid; the manager reads the counts (dhcp = auto). */
struct dhcp_request {
    unsigned char mac[6];   /* the VM (the request's source MAC and its own chaddr); the Wi-Fi's for the host */
    __u8 flags;             /* MACNAT_DHCP_*: how the latest request left */
    __u8 message;           /* its DHCP message type (option 53); 0 for BOOTP */
    __u32 port;             /* the VM's bridge port; 0 for the host's own request */
    __u32 requests;         /* requests seen with this xid (retransmissions too) */
    __u32 replies;          /* OFFER, ACK and NAK that answered them */
    __u32 pad;
    __u64 first_ns;
    __u64 time_ns;          /* the latest request */
};

/* pppoe[0]: the one VM whose PPPoE the station carries (a PPPoE server answers the station's MAC, with
 * nothing in the frame that says which VM it is for). */
struct pppoe_owner {
    unsigned char mac[6];   /* zero: nobody */
    __u16 pad;
    __u32 port;
    __u64 last_ns;          /* its last PPPoE frame: after MACNAT_PPPOE_IDLE_NS another VM may start */
};

/* Per-port accounting, without lost updates between the datapath and the manager: the datapath only
 * ever adds to ports[port].learned (atomically), the manager only ever writes port_released[port]
 * (learned read before its table scan, minus what the scan found), and a port's usage is the
 * difference. Entries learned during a scan count twice until the next sweep: the error refuses. */
struct port_counts {
    __u64 count[MACNAT_NUM_PORT_COUNTS];    /* indexed by MACNAT_PORT_* */
};

struct port_state {
    struct port_counts learned;
    __u64 window_start_ns;  /* the event rate limit's current one-second window */
    __u64 window_events[2]; /* sent in it: learning events, the others (each class has the limit: a port
                             * learning at its rate still reports its refusals) */
    __u64 events_suppressed;  /* in total, for the manager to tell how many it missed */
};

/* events: what the manager logs and acts on, rate-limited per port. */
struct event {
    __u64 time_ns;
    __u32 port;             /* the VM's bridge port; 0 for the LAN side */
    __u16 kind;             /* the counter index of what happened (learned_ip, refused_claim, ...) */
    __u16 pad;
    unsigned char mac[6];   /* the VM (or LAN host) that did it */
    unsigned char other[6]; /* the current owner of a claimed address, the LAN host of a DAD conflict */
    struct ip_addr ip;      /* the address concerned, zero for MAC events */
    __u32 pad2;
    __u64 port_suppressed;  /* events_suppressed of the port so far */
};

#endif
