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

struct mac_addr {
    unsigned char addr[6];
};

/* An address of either family, as every address map keys it: IPv6, or IPv4 mapped into IPv6 as
 * ::ffff:a.b.c.d (RFC 4291 2.5.5.2), so one table, one learning path and one refusal path serve both. */
struct ip_addr {
    __be32 addr[4];
};

/* config[0]: where this attachment forwards, written by the loader, kept current by the manager. */
struct macnat_config {
    unsigned char wifi_mac[6];
    __u16 pad;
    __u32 wifi_ifindex;
    __u32 bridge_ifindex;
    __u32 uplink_ifindex;
    __u32 flags;            /* MACNAT_CFG_* */
};

/* bindings: a VM's address -> the VM that owns it. */
struct binding {
    unsigned char mac[6];
    __u16 flags;            /* MACNAT_BINDING_* */
    __u64 last_seen_ns;     /* bpf_ktime_get_coarse_ns() of the VM's last frame from this address */
    __u64 tx_packets;       /* VM -> Wi-Fi */
    __u64 tx_bytes;
    __u64 rx_packets;       /* Wi-Fi -> VM */
    __u64 rx_bytes;
};

/* vm_macs: every MAC seen behind the bridge; lan_macs: LAN MACs that sent unicast to VMs. */
struct mac_seen {
    __u64 last_seen_ns;
};

/* refusals: an address a VM tried to use but may not (the host's, or another VM's static one). */
struct refusal {
    unsigned char mac[6];
    __u16 reason;           /* counter index of the refusal */
    __u64 count;
    __u64 last_ns;
};

#endif
