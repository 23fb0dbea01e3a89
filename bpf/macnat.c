/* macnat datapath: MAC address translation between a Wi-Fi station and a Linux bridge.
 *
 *      AP / LAN
 *         |  air: only frames with the station's source MAC get through
 *       wifi (wlan0)   wifi_ingress: Wi-Fi -> VMs (unicast by address binding; group frames copied)
 *         ^   |        wifi_egress:  host -> VMs
 *  redirect   | redirect into the bridge's own transmit path (br_dev_xmit)
 *         |   v
 *       uplink (veth, a port of the bridge; its peer only keeps the carrier up)
 *         |    uplink_egress: everything the bridge sends towards the LAN -> wifi
 *       bridge (vmbr0) --- VM ports
 *
 * Why a bridge port and not the bridge device's own ingress: a port receives flooded unknown
 * unicast (a VM talking to the gateway) without putting the bridge into promiscuous mode, and
 * redirecting at the port's egress costs no extra device crossing. Frames from Wi-Fi are redirected
 * into the bridge's transmit path, so the bridge never learns LAN MACs on the uplink; the manager
 * installs them as static FDB entries from lan_macs, and until it has, a VM's frame to such a MAC
 * is flooded (and still reaches the uplink): no first frame is lost.
 *
 * Learning is done here, synchronously, so the reply to a VM's very first ARP request or neighbour
 * solicitation already finds the binding; the manager only ages, protects and reports.
 *
 * Security (docs/design.md, "Security model"): a VM can only ever be itself. Its MAC belongs to the
 * bridge port it was first seen on (skb->ingress_ifindex at the uplink's egress is the VM's port);
 * it may bind only plausible unicast addresses that neither the host, the LAN nor another VM uses,
 * within per-port limits checked here, synchronously. Every VM frame is parsed and validated in
 * full before anything is learned from it, and learned from before it is cloned or rewritten, so a
 * frame that is dropped has changed no table.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/udp.h>

#include "macnat.h"

#define ARPHRD_ETHER_BE bpf_htons(1)
#define ARPOP_REQUEST_BE bpf_htons(1)
#define ARPOP_REPLY_BE bpf_htons(2)
#define BOOTP_BROADCAST_BE bpf_htons(0x8000)
#define DHCP_SERVER_PORT_BE bpf_htons(67)
#define DHCP_CLIENT_PORT_BE bpf_htons(68)
#define IP_FRAGMENT_MASK_BE bpf_htons(0x3fff)  /* MF flag and fragment offset */
#define IPV6_FRAGMENT_OFFSET_MASK 0xfff8
#define ETH_P_QINQ_OLD 0x9100                  /* pre-802.1ad QinQ, still in use */
#define ETH_P_WAKE_ON_LAN 0x0842               /* magic packets (etherwake): one-way, the target's MAC inside */
#define PPPOE_CODE_OFF (sizeof(struct ethhdr) + 1)  /* RFC 2516: version and type, code, session, length */
#define PPPOE_PADT 0xa7
#define NS_PER_S 1000000000ULL

/* RFC 4861 neighbour discovery */
#define ICMPV6_ROUTER_SOLICIT 133
#define ICMPV6_ROUTER_ADVERT 134
#define ICMPV6_NEIGHBOUR_SOLICIT 135
#define ICMPV6_NEIGHBOUR_ADVERT 136
#define ICMPV6_REDIRECT 137
#define ICMPV6_CSUM_OFF 2
#define NDP_TARGET_OFF 8        /* NS, NA and Redirect: type, code, checksum, 4 reserved bytes, target */
#define ND_OPT_SOURCE_LL 1
#define ND_OPT_TARGET_LL 2
/* The bounds of the two walks a VM's NDP message gets. A receiver reads every option within the
 * IPv6 payload and every extension header before the ICMPv6 one; macnat must see what it sees, so
 * what goes beyond these bounds (far more than real messages carry: an RA with a dozen prefixes has
 * about 20 options) is dropped rather than sent out unread. */
#define NDP_MAX_OPTIONS 64
#define IPV6_MAX_EXT_HEADERS 8

/* RFC 826 ARP for IPv4 over Ethernet, the only kind macnat forwards from VMs. */
struct arp_ipv4 {
    __be16 htype;
    __be16 ptype;
    __u8 hlen;
    __u8 plen;
    __be16 op;
    unsigned char sha[6];
    unsigned char spa[4];
    unsigned char tha[6];
    unsigned char tpa[4];
} __attribute__((packed));

/* A request or reply for IPv4 over Ethernet: what macnat translates and learns from. */
static __always_inline int arp_translatable(const struct arp_ipv4 *arp)
{
    return arp->htype == ARPHRD_ETHER_BE && arp->ptype == bpf_htons(ETH_P_IP) && arp->hlen == 6 && arp->plen == 4 &&
           (arp->op == ARPOP_REQUEST_BE || arp->op == ARPOP_REPLY_BE);
}

/* The fixed head of a BOOTP message (RFC 951), up to chaddr. */
struct bootp_head {
    __u8 op;
    __u8 htype;
    __u8 hlen;
    __u8 hops;
    __be32 xid;
    __be16 secs;
    __be16 flags;
    __be32 ciaddr;
    __be32 yiaddr;
    __be32 siaddr;
    __be32 giaddr;
    unsigned char chaddr[16];
} __attribute__((packed));

#define BOOTP_COOKIE_OFF 236    /* 236 bytes of fixed fields, then the 4-byte magic cookie (RFC 2131) */
#define BOOTP_OPTIONS_OFF 240
#define DHCP_MAGIC_COOKIE_BE bpf_htonl(0x63825363)
#define DHCP_OPT_PAD 0
#define DHCP_OPT_END 255
#define DHCP_OPT_MESSAGE_TYPE 53
#define DHCP_OPT_CLIENT_ID 61
#define DHCP_OFFER 2
#define DHCP_ACK 5
#define DHCP_CLIENT_ID_TYPE_ETHERNET 1      /* RFC 2132 9.14: a hardware type, then the address */
#define DHCP_CLIENT_ID_OPTION_LEN 9         /* code, length 7, type, MAC */
#define DHCP_MAX_REWRITTEN_IP_LEN 1500      /* a client identifier is added only within an Ethernet MTU */
/* Options read per message: dhcpcd's DISCOVER has about 12; PAD counts as one. */
#define DHCP_MAX_OPTIONS_SCANNED 64

#define ETH_ARP_LEN (sizeof(struct ethhdr) + sizeof(struct arp_ipv4))
#define ETH_IP_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr))
#define ETH_IP6_LEN (sizeof(struct ethhdr) + sizeof(struct ipv6hdr))
#define ARP_SHA_OFF (sizeof(struct ethhdr) + offsetof(struct arp_ipv4, sha))
#define ARP_THA_OFF (sizeof(struct ethhdr) + offsetof(struct arp_ipv4, tha))
#define BOOTP_FLAGS_OFF offsetof(struct bootp_head, flags)
#define IPV4_TOT_LEN_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, tot_len))
#define IPV4_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))

BPF_ARRAY(config, struct macnat_config, 1);
BPF_PERCPU_ARRAY(counters, __u64, MACNAT_NUM_COUNTERS);
BPF_HASH(bindings, struct ip_addr, struct binding, MACNAT_MAX_BINDINGS);
BPF_HASH(vm_macs, struct mac_addr, struct vm_mac, MACNAT_MAX_VM_MACS);
/* vm_hints[h(mac)] is set once a VM MAC hashing to h is learned: a clear slot proves a MAC is not a
 * VM's without the cost of hashing it into vm_macs (an array access is inlined by the verifier).
 * Slots are never cleared: a stale or shared one only costs the vm_macs lookup it would have saved. */
BPF_ARRAY(vm_hints, __u8, MACNAT_VM_HINT_SLOTS);
/* Plain hashes, not LRU: the entries the manager pins (the gateway) must never be evicted by a flood;
 * the manager ages the others. */
BPF_HASH(lan_macs, struct mac_addr, struct lan_mac, MACNAT_MAX_LAN_MACS);
BPF_HASH(lan_addrs, struct ip_addr, struct lan_addr, MACNAT_MAX_LAN_ADDRS);
BPF_HASH(host_addrs, struct ip_addr, __u8, MACNAT_MAX_HOST_ADDRS);
BPF_TABLE("lru_hash", struct ip_addr, struct refusal, refusals, MACNAT_MAX_REFUSALS);
BPF_LPM_TRIE(onlink, struct onlink_key, struct onlink_prefix, MACNAT_MAX_ONLINK_PREFIXES);
BPF_HASH(dhcp_requests, __be32, struct dhcp_request, MACNAT_MAX_DHCP_REQUESTS);
BPF_HASH(ports, __u32, struct port_state, MACNAT_MAX_PORTS);
BPF_HASH(port_released, __u32, struct port_counts, MACNAT_MAX_PORTS);
BPF_ARRAY(pppoe, struct pppoe_owner, 1);
BPF_RINGBUF_OUTPUT(events, MACNAT_EVENT_RING_BYTES / PAGE_SIZE);

static __always_inline void count(__u32 index)
{
    __u64 *value = counters.lookup(&index);
    if (value)
        *value += 1;
}

static __always_inline struct macnat_config *get_config(void)
{
    int zero = 0;
    return config.lookup(&zero);
}

/* MACs are 2-byte aligned wherever macnat keeps them (packet, map values, struct mac_addr). */
static __always_inline int mac_eq(const unsigned char *a, const unsigned char *b)
{
    const __u16 *x = (const __u16 *)a, *y = (const __u16 *)b;
    return !((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]));
}

static __always_inline int is_group(const unsigned char *mac)
{
    return mac[0] & 1;
}

static __always_inline int is_zero(const unsigned char *mac)
{
    const __u16 *x = (const __u16 *)mac;
    return !(x[0] | x[1] | x[2]);
}

static __always_inline __be32 load_ipv4(const unsigned char *p)
{
    __be32 ip;
    __builtin_memcpy(&ip, p, 4);
    return ip;
}

static __always_inline void ipv4_mapped(struct ip_addr *a, __be32 ip)
{
    a->addr[0] = 0;
    a->addr[1] = 0;
    a->addr[2] = bpf_htonl(0xffff);
    a->addr[3] = ip;
}

static __always_inline int is_ipv4_key(const struct ip_addr *a)
{
    return !(a->addr[0] | a->addr[1]) && a->addr[2] == bpf_htonl(0xffff);
}

static __always_inline int ipv6_unspecified(const struct ip_addr *a)
{
    return !(a->addr[0] | a->addr[1] | a->addr[2] | a->addr[3]);
}

static __always_inline int ipv6_multicast(const struct ip_addr *a)
{
    return (bpf_ntohl(a->addr[0]) >> 24) == 0xff;
}

/* ::/8: unspecified, loopback, IPv4-compatible and IPv4-mapped addresses. Never an IPv6 address of a
 * host on the LAN, and the mapped ones are the keys of IPv4 addresses: IPv6 frames never reach them. */
static __always_inline int ipv6_reserved(const struct ip_addr *a)
{
    return !(a->addr[0] & bpf_htonl(0xff000000));
}

/* An address LAN frames may be noted with: not unspecified, not a group, not a family crossing. */
static __always_inline int lan_unicast(const struct ip_addr *a)
{
    if (is_ipv4_key(a)) {
        __u32 host = bpf_ntohl(a->addr[3]);
        return host != 0 && (host >> 28) < 0xe;
    }
    return !ipv6_reserved(a) && !ipv6_multicast(a);
}

/* Make the first `len` bytes directly addressable; 0 when the frame is shorter than that. */
static __always_inline int pull(struct __sk_buff *skb, __u32 len)
{
    if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
        return 1;
    return skb->len >= len && bpf_skb_pull_data(skb, len) == 0 &&
           (void *)(long)skb->data + len <= (void *)(long)skb->data_end;
}

/* The header after Ethernet, with the frame's first `len` bytes directly addressable, and `eth` (if
 * asked for) pointing at the Ethernet header again; NULL when the frame is shorter than `len`. Every
 * packet pointer is invalid after the pull, so both come from skb->data afresh. */
static __always_inline void *l3_header(struct __sk_buff *skb, __u32 len, struct ethhdr **eth)
{
    if (!pull(skb, len))
        return NULL;
    void *data = (void *)(long)skb->data;
    if (data + len > (void *)(long)skb->data_end)
        return NULL;
    if (eth)
        *eth = data;
    return data + sizeof(struct ethhdr);
}

static __always_inline void touch(__u64 *last_seen_ns, __u64 now)
{
    /* Coarse time changes once a tick: most frames read the cache line without dirtying it. */
    if (*last_seen_ns != now)
        *last_seen_ns = now;
}

/* ---- per-port state, limits and events ----------------------------------------------------- */

static __always_inline struct port_state *port_state(__u32 port)
{
    struct port_state *state = ports.lookup(&port);
    if (state)
        return state;
    struct port_state fresh = {};
    ports.insert(&port, &fresh);  /* another CPU may have been first: either way it is there now */
    return ports.lookup(&port);
}

static __always_inline __u64 port_limit(struct macnat_config *cfg, __u32 kind)
{
    switch (kind) {
    case MACNAT_PORT_MACS:
        return cfg->max_macs_per_port ? cfg->max_macs_per_port : MACNAT_PORT_MAX_MACS;
    case MACNAT_PORT_IPV4:
        return cfg->max_ipv4_per_port ? cfg->max_ipv4_per_port : MACNAT_PORT_MAX_IPV4;
    case MACNAT_PORT_IPV6:
        return cfg->max_ipv6_per_port ? cfg->max_ipv6_per_port : MACNAT_PORT_MAX_IPV6;
    }
    return cfg->max_dhcp_per_port ? cfg->max_dhcp_per_port : MACNAT_PORT_MAX_DHCP_REQUESTS;
}

/* Whether a port may learn one more entry of a kind: what it learned minus what the manager found
 * released (both monotonic; the difference wraps correctly even when released ran ahead). */
static __always_inline int port_has_room(struct macnat_config *cfg, struct port_state *state, __u32 port,
                                         __u32 kind)
{
    struct port_counts *released = port_released.lookup(&port);
    __u64 used = state->learned.count[kind] - (released ? released->count[kind] : 0);
    return used < port_limit(cfg, kind);
}

static __always_inline void port_learned(struct port_state *state, __u32 kind)
{
    __sync_fetch_and_add(&state->learned.count[kind], 1);
}

/* Tell the manager, within the port's event rate: a flooding VM cannot flood the manager. The
 * window is reset without a lock; two CPUs racing over it only let a few more events through. */
static __always_inline void emit(struct macnat_config *cfg, __u16 kind, __u32 port, const unsigned char *mac,
                                 const unsigned char *other, const struct ip_addr *ip, __u64 now)
{
    struct port_state *state = port_state(port);
    if (!state)
        return;
    __u64 limit = cfg->events_per_port ? cfg->events_per_port : MACNAT_PORT_EVENTS_PER_SECOND;
    int learning = kind == MACNAT_CNT_LEARNED_MAC || kind == MACNAT_CNT_LEARNED_IP || kind == MACNAT_CNT_MOVED_IP;
    if (now - state->window_start_ns >= NS_PER_S) {
        state->window_start_ns = now;
        state->window_events[0] = 0;
        state->window_events[1] = 0;
    }
    __u64 *sent = &state->window_events[learning ? 0 : 1];
    if (*sent >= limit) {
        __sync_fetch_and_add(&state->events_suppressed, 1);
        count(MACNAT_CNT_EVENTS_SUPPRESSED);
        return;
    }
    __sync_fetch_and_add(sent, 1);
    struct event *ev = events.ringbuf_reserve(sizeof(struct event));
    if (!ev) {
        count(MACNAT_CNT_EVENTS_LOST);
        return;
    }
    ev->time_ns = now;
    ev->port = port;
    ev->kind = kind;
    ev->pad = 0;
    __builtin_memcpy(ev->mac, mac, 6);
    if (other)
        __builtin_memcpy(ev->other, other, 6);
    else
        __builtin_memset(ev->other, 0, 6);
    if (ip)
        __builtin_memcpy(&ev->ip, ip, sizeof(ev->ip));
    else
        __builtin_memset(&ev->ip, 0, sizeof(ev->ip));
    ev->pad2 = 0;
    ev->port_suppressed = state->events_suppressed;
    events.ringbuf_submit(ev, 0);
}

/* A VM frame refused: counted, reported, and for an address recorded with who claimed it from whom. */
static __always_inline void refuse(struct macnat_config *cfg, __u16 reason, __u32 port, const struct mac_addr *mac,
                                   const struct ip_addr *ip, const unsigned char *owner, __u64 now)
{
    count(reason);
    emit(cfg, reason, port, mac->addr, owner, ip, now);
    if (!ip)
        return;
    struct refusal *seen = refusals.lookup((struct ip_addr *)ip);
    if (seen && mac_eq(seen->mac, mac->addr) && seen->reason == reason) {
        __sync_fetch_and_add(&seen->count, 1);
        seen->last_ns = now;
        return;
    }
    struct refusal fresh = { .reason = reason, .port = port, .count = 1, .last_ns = now };
    __builtin_memcpy(fresh.mac, mac->addr, 6);
    if (owner)
        __builtin_memcpy(fresh.owner, owner, 6);
    refusals.update((struct ip_addr *)ip, &fresh);
}

/* ---- what a VM may be ------------------------------------------------------------------------ */

static __always_inline __u32 hint_slot(const unsigned char *mac)
{
    return ((__u32)mac[3] << 16 | (__u32)mac[4] << 8 | mac[5]) % MACNAT_VM_HINT_SLOTS;
}

/* Whether mac is one of the VMs'. */
static __always_inline int is_vm_mac(const struct mac_addr *mac)
{
    __u32 slot = hint_slot(mac->addr);
    __u8 *hint = vm_hints.lookup(&slot);
    return hint && *hint && vm_macs.lookup((struct mac_addr *)mac);
}

/* Whether a frame from `port` may carry `src` as its source MAC: 0, with *seen its vm_macs entry (NULL
 * for a MAC new to macnat), or the counter of the refusal. A MAC belongs to the port it was first
 * seen on; a static VM's MAC, put there by the manager with port 0, to the first port that uses it. */
static __always_inline int vet_mac(struct macnat_config *cfg, const struct mac_addr *src, __u32 port,
                                   struct port_state *state, struct vm_mac **seen)
{
    struct vm_mac *known = vm_macs.lookup((struct mac_addr *)src);
    *seen = known;
    if (known)
        return known->port == port || known->port == 0 ? 0 : MACNAT_CNT_REFUSED_MAC_PORT;
    if (mac_eq(src->addr, cfg->wifi_mac))
        return MACNAT_CNT_REFUSED_MAC_WIFI;
    if (lan_macs.lookup((struct mac_addr *)src))
        return MACNAT_CNT_REFUSED_MAC_LAN;
    if (!port_has_room(cfg, state, port, MACNAT_PORT_MACS))
        return MACNAT_CNT_REFUSED_LIMIT_MACS;
    return 0;
}

/* Remember a vetted MAC on its port. 0, or -1 when the table is full (the frame is dropped). */
static __always_inline int commit_mac(struct macnat_config *cfg, const struct mac_addr *mac, __u32 port,
                                      struct port_state *state, struct vm_mac *seen, __u64 now)
{
    if (seen) {
        touch(&seen->last_seen_ns, now);
        if (seen->port == 0) {
            seen->port = port;
            port_learned(state, MACNAT_PORT_MACS);
        }
        return 0;
    }
    struct vm_mac fresh = { .last_seen_ns = now, .port = port };
    if (vm_macs.insert((struct mac_addr *)mac, &fresh)) {
        count(MACNAT_CNT_DROP_TABLE_FULL);
        return -1;
    }
    __u32 slot = hint_slot(mac->addr);
    __u8 *hint = vm_hints.lookup(&slot);
    if (hint)
        *hint = 1;
    port_learned(state, MACNAT_PORT_MACS);
    count(MACNAT_CNT_LEARNED_MAC);
    emit(cfg, MACNAT_CNT_LEARNED_MAC, port, mac->addr, NULL, NULL, now);
    return 0;
}

static __always_inline int in_prefix(__u32 host, __u32 network, __u32 mask)
{
    return (host & mask) == network;
}

/* 0 when ip, from a frame of the family `ipv6` says, is an address a VM may have, as far as the
 * address itself goes; else the refusal's counter. Only plausible unicast: no loopback, group,
 * broadcast or reserved address, no family crossing (an IPv6 address in ::/8 would land on the IPv4
 * keys), link-local IPv4 and documentation prefixes only if configured, and inside the LAN's on-link
 * prefixes when the manager knows them. */
static __always_inline int vet_address(struct macnat_config *cfg, const struct ip_addr *ip, int ipv6)
{
    struct onlink_key key = { .prefixlen = 128 };
    __builtin_memcpy(&key.addr, ip, sizeof(key.addr));
    if (!ipv6) {
        __u32 host = bpf_ntohl(ip->addr[3]);
        __u32 first = host >> 24;
        /* 0/8, 127/8, 224/4 (multicast) and 240/4 (reserved, with the limited broadcast) */
        if (first == 0 || first == 127 || first >= 224)
            return MACNAT_CNT_REFUSED_ADDRESS;
        if (in_prefix(host, 0xa9fe0000, 0xffff0000))  /* 169.254/16: on-link wherever it is allowed */
            return cfg->flags & MACNAT_CFG_ALLOW_IPV4_LINK_LOCAL ? 0 : MACNAT_CNT_REFUSED_ADDRESS;
        if (!(cfg->flags & MACNAT_CFG_ALLOW_DOCUMENTATION) &&  /* RFC 5737 */
            (in_prefix(host, 0xc0000200, 0xffffff00) || in_prefix(host, 0xc6336400, 0xffffff00) ||
             in_prefix(host, 0xcb007100, 0xffffff00)))
            return MACNAT_CNT_REFUSED_ADDRESS;
        if (!(cfg->flags & MACNAT_CFG_ONLINK_IPV4))
            return 0;
        struct onlink_prefix *prefix = onlink.lookup(&key);
        if (!prefix || prefix->prefixlen < 96 || prefix->prefixlen > 128)  /* an IPv6 prefix does not count */
            return MACNAT_CNT_REFUSED_ADDRESS;
        __u32 length = prefix->prefixlen - 96;
        if (length <= 30) {  /* the subnet's network and broadcast addresses (a /31 has neither, RFC 3021) */
            __u32 host_part = length ? 0xffffffff >> length : 0xffffffff;
            if (!(host & host_part) || (host & host_part) == host_part)
                return MACNAT_CNT_REFUSED_ADDRESS;
        }
        return 0;
    }
    __u32 first = bpf_ntohl(ip->addr[0]);
    if (ipv6_reserved(ip) || ipv6_multicast(ip))
        return MACNAT_CNT_REFUSED_ADDRESS;
    if (in_prefix(first, 0xfe800000, 0xffc00000))  /* fe80::/10 is on-link by definition */
        return 0;
    if (!(cfg->flags & MACNAT_CFG_ALLOW_DOCUMENTATION) &&  /* RFC 3849, RFC 9637 */
        (first == 0x20010db8 || in_prefix(first, 0x3fff0000, 0xfffff000)))
        return MACNAT_CNT_REFUSED_ADDRESS;
    if ((cfg->flags & MACNAT_CFG_ONLINK_IPV6) && !onlink.lookup(&key))
        return MACNAT_CNT_REFUSED_ADDRESS;
    return 0;
}

static __always_inline __u32 family_kind(const struct ip_addr *ip)
{
    return is_ipv4_key(ip) ? MACNAT_PORT_IPV4 : MACNAT_PORT_IPV6;
}

/* Whether the VM `mac` on `port` may have `ip` bound to it, given what bindings holds for it
 * (`known`): 0, or the refusal's counter. A binding never moves on an ordinary frame: a claim of
 * another VM's address is refused and recorded, for the manager to probe the owner. */
static __always_inline int vet_claim(struct macnat_config *cfg, const struct ip_addr *ip, int ipv6,
                                     const struct mac_addr *mac, __u32 port, struct port_state *state,
                                     struct binding *known)
{
    int reason = vet_address(cfg, ip, ipv6);
    if (reason)
        return reason;
    if (host_addrs.lookup((struct ip_addr *)ip))
        return MACNAT_CNT_REFUSED_HOST_IP;
    if (known) {
        if (mac_eq(known->mac, mac->addr))
            return 0;
        return known->flags & MACNAT_BINDING_STATIC ? MACNAT_CNT_REFUSED_STATIC : MACNAT_CNT_REFUSED_CLAIM;
    }
    if (lan_addrs.lookup((struct ip_addr *)ip))
        return MACNAT_CNT_REFUSED_LAN_IP;
    if (!port_has_room(cfg, state, port, family_kind(ip)))
        return is_ipv4_key(ip) ? MACNAT_CNT_REFUSED_LIMIT_IPV4 : MACNAT_CNT_REFUSED_LIMIT_IPV6;
    return 0;
}

/* Bind a vetted address to its VM. 0, or -1 when the table is full. */
static __always_inline int commit_binding(struct macnat_config *cfg, struct ip_addr *ip, const struct mac_addr *mac,
                                          __u32 port, struct port_state *state, struct binding *known, __u64 now,
                                          __u64 packets, __u64 bytes)
{
    if (known) {  /* the VM's own: static and not used yet, or from before its port was released */
        known->port = port;
        touch(&known->last_seen_ns, now);
        __sync_fetch_and_add(&known->tx_packets, packets);
        __sync_fetch_and_add(&known->tx_bytes, bytes);
        return 0;
    }
    struct binding fresh = { .port = port, .last_seen_ns = now, .tx_packets = packets, .tx_bytes = bytes };
    __builtin_memcpy(fresh.mac, mac->addr, 6);
    if (bindings.insert(ip, &fresh)) {
        count(MACNAT_CNT_DROP_TABLE_FULL);
        return -1;
    }
    port_learned(state, family_kind(ip));
    count(MACNAT_CNT_LEARNED_IP);
    emit(cfg, MACNAT_CNT_LEARNED_IP, port, mac->addr, NULL, ip, now);
    return 0;
}

/* ---- DHCP ------------------------------------------------------------------------------------ */

/* What a DHCP message's options say, as far as macnat reads them. */
struct dhcp_options {
    __u32 client_id_off;    /* option 61 (its code byte); 0 when absent */
    __u32 end_off;          /* the END option; 0 when the walk did not reach one */
    __u8 message;           /* option 53; 0 for BOOTP (no magic cookie, or no message type) */
    __u8 client_id_len;
};

/* A DHCP request (BOOTP op 1, Ethernet) of a VM, or of the host, as far as macnat rewrites and remembers it. */
struct dhcp_request_seen {
    __u32 udp_off;
    __u32 udp_end;
    __be32 xid;
    struct mac_addr chaddr;
    __be16 flags;
    __u8 rewrite;           /* dhcp = rewrite, and it can be: chaddr goes, a client identifier stays or is added */
    struct dhcp_options options;
};

/* Walk the options from off (after the magic cookie) to end as a receiver reads them: PAD skipped, END
 * stops, an option running past `end` stops the walk without an END. Bounded, with one exit at the end of
 * the loop (the verifier follows the rest of the program from few states). */
static __always_inline void scan_dhcp_options(struct __sk_buff *skb, __u32 off, __u32 end, struct dhcp_options *o)
{
    int done = 0;
    for (int i = 0; i < DHCP_MAX_OPTIONS_SCANNED; i++) {
        __u8 option[2] = {};
        if (done)
            continue;
        if (off >= end || bpf_skb_load_bytes(skb, off, option, 1)) {
            done = 1;
            continue;
        }
        if (option[0] == DHCP_OPT_PAD) {
            off += 1;
            continue;
        }
        if (option[0] == DHCP_OPT_END) {
            o->end_off = off;
            done = 1;
            continue;
        }
        if (off + 2 > end || bpf_skb_load_bytes(skb, off, option, 2) || off + 2 + option[1] > end) {
            done = 1;
            continue;
        }
        if (option[0] == DHCP_OPT_MESSAGE_TYPE && option[1] == 1)
            bpf_skb_load_bytes(skb, off + 2, &o->message, 1);
        if (option[0] == DHCP_OPT_CLIENT_ID) {
            o->client_id_off = off;
            o->client_id_len = option[1];
        }
        off += 2 + option[1];
    }
}

/* The BOOTP request in an unfragmented IPv4/UDP datagram at l4_off (UDP 68 -> 67 already seen); 0 when it
 * is one whose fixed fields lie within the UDP and IPv4 lengths, else -1. A DHCP message's options are
 * read too when `options` is set. */
static __always_inline int parse_dhcp_request(struct __sk_buff *skb, __u32 l4_off, __u32 l3_end,
                                              struct dhcp_request_seen *req, int options)
{
    struct udphdr udp;
    __u8 head[12];  /* op, htype, hlen, hops, xid, secs, flags */
    __be32 cookie;
    if (bpf_skb_load_bytes(skb, l4_off, &udp, sizeof(udp)))
        return -1;
    __u32 end = l4_off + bpf_ntohs(udp.len);
    __u32 bootp = l4_off + sizeof(udp);
    if (end > l3_end || end < bootp + BOOTP_OPTIONS_OFF ||
        bpf_skb_load_bytes(skb, bootp, head, sizeof(head)) ||
        bpf_skb_load_bytes(skb, bootp + offsetof(struct bootp_head, chaddr), req->chaddr.addr, 6))
        return -1;
    if (head[0] != 1 || head[1] != 1 || head[2] != 6)
        return -1;
    req->udp_off = l4_off;
    req->udp_end = end;
    __builtin_memcpy(&req->xid, head + 4, 4);
    __builtin_memcpy(&req->flags, head + BOOTP_FLAGS_OFF, 2);
    if (options && !bpf_skb_load_bytes(skb, bootp + BOOTP_COOKIE_OFF, &cookie, 4) && cookie == DHCP_MAGIC_COOKIE_BE)
        scan_dhcp_options(skb, bootp + BOOTP_OPTIONS_OFF, end, &req->options);
    return 0;
}

/* Whether a VM's DHCP message can leave with the Wi-Fi MAC as chaddr (dhcp = rewrite): only a DHCP
 * message (BOOTP's only identity is chaddr) of a client that is the VM itself, which carries a client
 * identifier or has room for one before its END option. Without one, the server would take the VM for
 * this host. Room: nothing after the UDP datagram (no trailer to move), and within an Ethernet MTU. */
static __always_inline int dhcp_rewritable(struct __sk_buff *skb, const struct dhcp_request_seen *req,
                                           const struct mac_addr *src, __u32 l3_end)
{
    if (!req->options.message || !mac_eq(req->chaddr.addr, src->addr))
        return 0;
    if (req->options.client_id_off)
        return 1;
    return req->options.end_off && req->udp_end == l3_end && l3_end == skb->len &&
           l3_end - sizeof(struct ethhdr) + DHCP_CLIENT_ID_OPTION_LEN <= DHCP_MAX_REWRITTEN_IP_LEN;
}

/* Remember a request by its xid, so that the server's answer finds its VM: 1 when it is remembered as
 * this sender's, 0 when not. A recent request of another sender with the same xid is not overwritten (a VM
 * sees the others' broadcasts and the host's, xids included), and each VM port has a limit of requests
 * remembered; the host's (port 0) count for no port. */
static __always_inline int remember_dhcp_request(struct macnat_config *cfg, const struct dhcp_request_seen *req,
                                                 const struct mac_addr *src, __u32 port, __u64 now, __u8 flags)
{
    if (!mac_eq(req->chaddr.addr, src->addr))
        return 0;  /* a relay or a client with another identity: its ACK is not this VM's to bind */
    struct dhcp_request *known = dhcp_requests.lookup((__be32 *)&req->xid);
    if (known && mac_eq(known->mac, src->addr) && known->port == port) {
        touch(&known->time_ns, now);  /* a retransmission, or the REQUEST after the DISCOVER */
        known->requests += 1;
        known->flags = flags;
        known->message = req->options.message;
        return 1;
    }
    if (known && !mac_eq(known->mac, src->addr) && now - known->time_ns < MACNAT_DHCP_REQUEST_TTL_NS) {
        count(MACNAT_CNT_DHCP_UNTRACKED);
        return 0;
    }
    struct port_state *state = NULL;
    int fresh_for_port = !known || known->port != port;
    if (port) {
        state = port_state(port);
        if (!state || (fresh_for_port && !port_has_room(cfg, state, port, MACNAT_PORT_DHCP_REQUESTS))) {
            count(MACNAT_CNT_DHCP_UNTRACKED);
            return 0;
        }
    }
    struct dhcp_request entry = { .flags = flags, .message = req->options.message, .port = port, .requests = 1,
                                  .first_ns = now, .time_ns = now };
    __builtin_memcpy(entry.mac, src->addr, 6);
    if (dhcp_requests.update((__be32 *)&req->xid, &entry)) {
        count(MACNAT_CNT_DHCP_UNTRACKED);
        return 0;
    }
    if (state && fresh_for_port)
        port_learned(state, MACNAT_PORT_DHCP_REQUESTS);
    return 1;
}

/* A VM's DHCP request gets the BOOTP broadcast flag, so the server's answer is a broadcast that
 * the AP delivers: a unicast reply would be addressed to the VM's MAC, which the AP never sends to
 * the station. The UDP checksum is updated incrementally (RFC 1624); a zero checksum (none) stays
 * zero, and a CHECKSUM_PARTIAL skb keeps its pseudo-header sum for the device to finish. */
static __always_inline void set_dhcp_broadcast(struct __sk_buff *skb, const struct dhcp_request_seen *req)
{
    if (req->flags & BOOTP_BROADCAST_BE)
        return;
    __be16 with_broadcast = req->flags | BOOTP_BROADCAST_BE;
    __u32 flags_off = req->udp_off + sizeof(struct udphdr) + BOOTP_FLAGS_OFF;
    bpf_l4_csum_replace(skb, req->udp_off + offsetof(struct udphdr, check), req->flags, with_broadcast,
                        BPF_F_MARK_MANGLED_0 | sizeof(with_broadcast));
    bpf_skb_store_bytes(skb, flags_off, &with_broadcast, sizeof(with_broadcast), 0);
    count(MACNAT_CNT_DHCP_FLAG_SET);
}

/* Write `len` bytes (at most 10) at off inside the UDP datagram whose checksum is at csum_off, with the
 * checksum updated by the difference. The difference is taken over a 12-byte window starting at an even
 * offset, as the checksum's 16-bit words do (the UDP header lies at an even offset): an odd `off` gets a
 * leading zero byte. Zero checksums stay zero; CHECKSUM_PARTIAL needs nothing for payload bytes. */
static __always_inline void store_udp_bytes(struct __sk_buff *skb, __u32 off, const unsigned char *bytes, __u32 len,
                                            __u32 csum_off)
{
    __u8 old[12] = {}, new[12] = {};
    if (off & 1) {
        if (bpf_skb_load_bytes(skb, off, old + 1, len))
            return;
        __builtin_memcpy(new + 1, bytes, len);
    } else {
        if (bpf_skb_load_bytes(skb, off, old, len))
            return;
        __builtin_memcpy(new, bytes, len);
    }
    __s64 diff = bpf_csum_diff((__be32 *)old, sizeof(old), (__be32 *)new, sizeof(new), 0);
    bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_MARK_MANGLED_0);
    bpf_skb_store_bytes(skb, off, (void *)bytes, len, 0);
}

/* dhcp = rewrite: the message leaves with the Wi-Fi MAC as chaddr, which a network that checks chaddr
 * against the frame's source (DHCP snooping, hostapd's proxy ARP) wants. The VM is still told apart by
 * its client identifier (option 61): its own, or one added from its MAC (type 1, RFC 2132), inserted
 * before END; the datagram grows by 9 bytes, and the IPv4 total length, UDP length and both checksums
 * follow (the pseudo-header's length too, which is all a CHECKSUM_PARTIAL skb has). 0 when done; -1 when
 * the frame could not grow, and nothing was changed. */
static __always_inline int rewrite_dhcp_request(struct __sk_buff *skb, struct macnat_config *cfg,
                                                const struct dhcp_request_seen *req, const struct mac_addr *src)
{
    __u32 csum_off = req->udp_off + offsetof(struct udphdr, check);
    if (!req->options.client_id_off) {
        __u8 zeros[DHCP_CLIENT_ID_OPTION_LEN] = {};
        __u32 old_len = skb->len;
        if (bpf_skb_change_tail(skb, old_len + DHCP_CLIENT_ID_OPTION_LEN, 0))
            return -1;
        bpf_skb_store_bytes(skb, old_len, zeros, sizeof(zeros), 0);  /* the padding after END, as it was */
        unsigned char option[DHCP_CLIENT_ID_OPTION_LEN + 1] = { DHCP_OPT_CLIENT_ID, 7, DHCP_CLIENT_ID_TYPE_ETHERNET };
        __builtin_memcpy(option + 3, src->addr, 6);
        option[DHCP_CLIENT_ID_OPTION_LEN] = DHCP_OPT_END;
        store_udp_bytes(skb, req->options.end_off, option, sizeof(option), csum_off);
        __be16 old_udp_len = bpf_htons(req->udp_end - req->udp_off);
        __be16 new_udp_len = bpf_htons(req->udp_end - req->udp_off + DHCP_CLIENT_ID_OPTION_LEN);
        bpf_l4_csum_replace(skb, csum_off, old_udp_len, new_udp_len, BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR | 2);
        bpf_l4_csum_replace(skb, csum_off, old_udp_len, new_udp_len, BPF_F_MARK_MANGLED_0 | 2);
        bpf_skb_store_bytes(skb, req->udp_off + offsetof(struct udphdr, len), &new_udp_len, 2, 0);
        __be16 old_ip_len = bpf_htons(old_len - sizeof(struct ethhdr));
        __be16 new_ip_len = bpf_htons(old_len - sizeof(struct ethhdr) + DHCP_CLIENT_ID_OPTION_LEN);
        bpf_l3_csum_replace(skb, IPV4_CSUM_OFF, old_ip_len, new_ip_len, 2);
        bpf_skb_store_bytes(skb, IPV4_TOT_LEN_OFF, &new_ip_len, 2, 0);
        count(MACNAT_CNT_DHCP_CLIENT_ID_ADDED);
    }
    store_udp_bytes(skb, req->udp_off + sizeof(struct udphdr) + offsetof(struct bootp_head, chaddr), cfg->wifi_mac, 6,
                    csum_off);
    count(MACNAT_CNT_DHCP_REWRITTEN);
    return 0;
}

/* Bind (or move) a leased address to the VM whose own request the DHCPACK answers: the server is the
 * authority on its leases, so the address moves at once even from another VM, and an address the LAN
 * was seen using (unless pinned, as the gateway's is) is the server's to re-assign. */
static __always_inline void bind_from_dhcp(struct macnat_config *cfg, struct ip_addr *ip, const struct mac_addr *mac,
                                           __u32 port, __u64 now)
{
    struct port_state *state = port_state(port);
    if (!state)
        return;
    struct binding *known = bindings.lookup(ip);
    if (known && mac_eq(known->mac, mac->addr)) {
        touch(&known->last_seen_ns, now);
        return;
    }
    struct lan_addr *lan = lan_addrs.lookup(ip);
    int reason = vet_address(cfg, ip, 0);
    if (!reason && host_addrs.lookup(ip))
        reason = MACNAT_CNT_REFUSED_HOST_IP;
    if (!reason && known && (known->flags & MACNAT_BINDING_STATIC))
        reason = MACNAT_CNT_REFUSED_STATIC;
    if (!reason && lan && (lan->flags & MACNAT_LAN_PINNED))
        reason = MACNAT_CNT_REFUSED_LAN_IP;
    if (!reason && !port_has_room(cfg, state, port, MACNAT_PORT_IPV4))
        reason = MACNAT_CNT_REFUSED_LIMIT_IPV4;
    if (reason) {
        refuse(cfg, reason, port, mac, ip, known ? known->mac : NULL, now);
        return;
    }
    struct binding fresh = { .port = port, .last_seen_ns = now };
    __builtin_memcpy(fresh.mac, mac->addr, 6);
    unsigned char owner[6] = {};
    if (known)
        __builtin_memcpy(owner, known->mac, 6);
    if (bindings.update(ip, &fresh)) {
        count(MACNAT_CNT_DROP_TABLE_FULL);
        return;
    }
    if (lan)
        lan_addrs.delete(ip);
    port_learned(state, MACNAT_PORT_IPV4);
    __u16 kind = known ? MACNAT_CNT_MOVED_IP : MACNAT_CNT_LEARNED_IP;
    count(kind);
    emit(cfg, kind, port, mac->addr, known ? owner : NULL, ip, now);
}

#define DHCP_NOT_A_VMS 0    /* dhcp_reply(): the frame goes its way */
#define DHCP_FOR_VM 1       /* ... it answers a VM's request: *vm is the VM */
#define DHCP_DROP -1        /* ... it must not reach the VM */

/* A server's reply (OFFER, ACK or NAK; UDP 67 -> 68 at l4_off, broadcast or unicast to the station) to
 * a recent request of a VM: same xid, and the VM's own chaddr or, for a request that left rewritten, the
 * Wi-Fi's. Such a reply counts as an answer (dhcp = auto reads it), gets the VM's chaddr back (and loses
 * the client identifier macnat added, echoed by the server as RFC 6842 wants, which the VM never sent),
 * and a DHCPACK binds its address to the VM at once. A rewritten request's offer or ACK of this host's own
 * address is dropped: the server took the VM for this host. Any other DHCPACK (a forged one from a LAN host
 * above all) binds nothing. Only what lies within the UDP and IPv4 lengths is read. */
static __always_inline int dhcp_reply(struct __sk_buff *skb, struct macnat_config *cfg, const struct mac_addr *src,
                                      __u32 l4_off, __u32 l3_end, struct mac_addr *vm)
{
    struct udphdr udp;
    struct bootp_head head;
    __be32 cookie;

    if (bpf_skb_load_bytes(skb, l4_off, &udp, sizeof(udp)) ||
        udp.source != DHCP_SERVER_PORT_BE || udp.dest != DHCP_CLIENT_PORT_BE)
        return DHCP_NOT_A_VMS;
    __u32 end = l4_off + bpf_ntohs(udp.len);
    __u32 bootp = l4_off + sizeof(udp);
    if (end > l3_end || end < bootp + BOOTP_OPTIONS_OFF ||
        bpf_skb_load_bytes(skb, bootp, &head, sizeof(head)) || head.op != 2 || head.htype != 1 || head.hlen != 6)
        return DHCP_NOT_A_VMS;
    struct dhcp_options options = {};
    if (!bpf_skb_load_bytes(skb, bootp + BOOTP_COOKIE_OFF, &cookie, 4) && cookie == DHCP_MAGIC_COOKIE_BE)
        scan_dhcp_options(skb, bootp + BOOTP_OPTIONS_OFF, end, &options);

    __u64 now = bpf_ktime_get_coarse_ns();
    struct mac_addr client;
    struct ip_addr yiaddr;
    __builtin_memcpy(client.addr, head.chaddr, 6);
    ipv4_mapped(&yiaddr, head.yiaddr);
    struct dhcp_request *req = dhcp_requests.lookup(&head.xid);
    int recent = req && now - req->time_ns < MACNAT_DHCP_REQUEST_TTL_NS;
    int own = recent && mac_eq(req->mac, client.addr);
    int rewritten = recent && !own && (req->flags & MACNAT_DHCP_REWRITTEN) && mac_eq(client.addr, cfg->wifi_mac);
    if (!own && !rewritten) {
        if (options.message == DHCP_ACK) {
            count(MACNAT_CNT_DHCP_ACK_UNMATCHED);
            emit(cfg, MACNAT_CNT_DHCP_ACK_UNMATCHED, 0, src->addr, client.addr, &yiaddr, now);
        }
        return DHCP_NOT_A_VMS;
    }
    req->replies += 1;
    if (!req->port)
        return DHCP_NOT_A_VMS;  /* the host's own */
    __builtin_memcpy(vm->addr, req->mac, 6);
    __u32 port = req->port;
    if (rewritten) {
        if ((options.message == DHCP_OFFER || options.message == DHCP_ACK) && host_addrs.lookup(&yiaddr)) {
            count(MACNAT_CNT_DROP_DHCP_HOST_ADDRESS);
            return DHCP_DROP;
        }
        __u32 csum_off = l4_off + offsetof(struct udphdr, check);
        store_udp_bytes(skb, bootp + offsetof(struct bootp_head, chaddr), vm->addr, 6, csum_off);
        if ((req->flags & MACNAT_DHCP_CLIENT_ID_ADDED) && options.client_id_off &&
            options.client_id_len == DHCP_CLIENT_ID_OPTION_LEN - 2) {
            __u8 pads[DHCP_CLIENT_ID_OPTION_LEN] = {};  /* PAD options */
            store_udp_bytes(skb, options.client_id_off, pads, sizeof(pads), csum_off);
        }
        count(MACNAT_CNT_DHCP_REPLY_RESTORED);
    }
    if (options.message == DHCP_ACK && head.yiaddr)
        bind_from_dhcp(cfg, &yiaddr, vm, port, now);
    return DHCP_FOR_VM;
}

/* Offset of the UDP header of an unfragmented IPv4/UDP frame, or 0; *l3_end the end of the datagram. */
static __always_inline __u32 ipv4_udp_offset(struct __sk_buff *skb, __u32 *l3_end)
{
    struct iphdr iph;
    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &iph, sizeof(iph)) || iph.ihl < 5 ||
        iph.protocol != IPPROTO_UDP || (iph.frag_off & IP_FRAGMENT_MASK_BE))
        return 0;
    *l3_end = sizeof(struct ethhdr) + bpf_ntohs(iph.tot_len);
    return sizeof(struct ethhdr) + iph.ihl * 4;
}

/* The host's own broadcast DHCP request (chaddr the Wi-Fi's), remembered as the host's (port 0): the VMs
 * see it, and one that copied its xid is not remembered, so that its rewritten request never takes the
 * host's answers; the host's answered requests also show dhcp = auto that the server answers the station. */
static __always_inline void note_host_dhcp_request(struct __sk_buff *skb, struct macnat_config *cfg)
{
    __u32 l3_end = 0;
    __u32 l4_off = ipv4_udp_offset(skb, &l3_end);
    struct udphdr udp;
    struct dhcp_request_seen req = {};
    struct mac_addr wifi;
    if (!l4_off || bpf_skb_load_bytes(skb, l4_off, &udp, sizeof(udp)) || udp.dest != DHCP_SERVER_PORT_BE ||
        udp.source != DHCP_CLIENT_PORT_BE || parse_dhcp_request(skb, l4_off, l3_end, &req, 0))
        return;
    __builtin_memcpy(wifi.addr, cfg->wifi_mac, 6);
    remember_dhcp_request(cfg, &req, &wifi, 0, bpf_ktime_get_coarse_ns(), 0);
}

/* ---- neighbour discovery --------------------------------------------------------------------- */

/* Where the options of an NDP message of this type start, relative to the ICMPv6 header; 0 when the
 * type is not NDP. */
static __always_inline __u32 ndp_options_offset(__u8 type)
{
    switch (type) {
    case ICMPV6_ROUTER_SOLICIT:
        return 8;
    case ICMPV6_ROUTER_ADVERT:
        return 16;
    case ICMPV6_NEIGHBOUR_SOLICIT:
    case ICMPV6_NEIGHBOUR_ADVERT:
        return 24;
    case ICMPV6_REDIRECT:
        return 40;
    }
    return 0;
}

/* The upper-layer protocol of an IPv6 packet whose header chain continues at *off with `nexthdr`,
 * skipping hop-by-hop, routing, destination options, fragment and AH headers as a receiver does;
 * *off is left at the upper-layer header. IPPROTO_NONE for a fragment other than the first (its
 * upper-layer header is elsewhere), -1 for a chain longer than the bound or beyond `end`. */
static __always_inline int ipv6_upper_layer(struct __sk_buff *skb, __u8 nexthdr, __u32 *off, __u32 end,
                                            int *fragmented)
{
    for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
        if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING && nexthdr != IPPROTO_DSTOPTS &&
            nexthdr != IPPROTO_FRAGMENT && nexthdr != IPPROTO_AH)
            return nexthdr;
        __u8 ext[4];  /* next header, length, and for a fragment header its offset and flags */
        if (*off + 8 > end || bpf_skb_load_bytes(skb, *off, ext, sizeof(ext)))
            return -1;
        if (nexthdr == IPPROTO_FRAGMENT) {
            *fragmented = 1;
            if (((__u16)ext[2] << 8 | ext[3]) & IPV6_FRAGMENT_OFFSET_MASK)
                return IPPROTO_NONE;
            *off += 8;
        } else if (nexthdr == IPPROTO_AH) {
            *off += ((__u32)ext[1] + 2) * 4;
        } else {
            *off += ((__u32)ext[1] + 1) * 8;
        }
        nexthdr = ext[0];
    }
    return -1;
}

/* A MAC inside ARP or NDP that must not leave: the sender's or another VM's. */
static __always_inline int vm_mac_inside(const unsigned char *mac, const struct mac_addr *src)
{
    struct mac_addr carried;
    __builtin_memcpy(carried.addr, mac, 6);
    return mac_eq(carried.addr, src->addr) || is_vm_mac(&carried);
}

/* The option list of an NDP message, from off to end (the IPv6 payload's end), as a receiver reads
 * it (RFC 4861 4.6): 1 when it has link-layer address options, 0 when it has none, -1 for a list a
 * receiver rejects (an option of length 0, or past the payload), a link-layer option that is no
 * Ethernet address (not 8 bytes), or a list longer than the walk's bound. Only lengths are read, and
 * the loop has one exit, at its end: the verifier then follows the rest of the program from three
 * states, not from one per option. */
static __always_inline int ndp_link_layer_options(struct __sk_buff *skb, __u32 off, __u32 end)
{
    int verdict = -1, found = 0, done = 0;
    for (int i = 0; i < NDP_MAX_OPTIONS; i++) {
        __u8 option[2] = {};
        if (done)
            continue;
        if (off >= end) {
            verdict = found;
            done = 1;
            continue;
        }
        __u32 length = 0;
        if (off + 2 <= end && !bpf_skb_load_bytes(skb, off, option, 2))
            length = option[1] * 8;
        int link_layer = option[0] == ND_OPT_SOURCE_LL || option[0] == ND_OPT_TARGET_LL;
        if (!length || off + length > end || (link_layer && length != 8)) {
            done = 1;
            continue;
        }
        found |= link_layer;
        off += length;
    }
    if (!done && off >= end)
        verdict = found;
    return verdict;
}

/* Every link-layer address option of a validated NDP message that carries a VM's MAC (the sender's or
 * another's) gets the Wi-Fi MAC; the ICMPv6 checksum is updated by the difference over the option
 * (the pseudo-header does not change). */
static __always_inline void rewrite_ndp_options(struct __sk_buff *skb, struct macnat_config *cfg, __u32 l4_off,
                                                __u32 off, __u32 end, const struct mac_addr *src)
{
    for (int i = 0; i < NDP_MAX_OPTIONS; i++) {
        __u8 option[8];
        if (off + 8 > end || bpf_skb_load_bytes(skb, off, option, sizeof(option)))
            return;
        if ((option[0] == ND_OPT_SOURCE_LL || option[0] == ND_OPT_TARGET_LL) && vm_mac_inside(option + 2, src)) {
            __u8 rewritten[8];
            __builtin_memcpy(rewritten, option, 2);
            __builtin_memcpy(rewritten + 2, cfg->wifi_mac, 6);
            __s64 diff = bpf_csum_diff((__be32 *)option, sizeof(option), (__be32 *)rewritten, sizeof(rewritten), 0);
            bpf_l4_csum_replace(skb, l4_off + ICMPV6_CSUM_OFF, 0, diff, 0);
            bpf_skb_store_bytes(skb, off + 2, cfg->wifi_mac, 6, 0);
            count(MACNAT_CNT_NDP_REWRITTEN);
        }
        off += option[1] * 8;
    }
}

/* ---- other EtherTypes, PPPoE ------------------------------------------------------------- */

/* Whether a VM frame of this EtherType may go out as the station's: 0 for IPv4, ARP and IPv6 (translated
 * whole), PPPoE (one VM at a time: its server answers the station's MAC, with nothing in the frame that
 * names a VM) and Wake-on-LAN (one-way); else the counter of the drop. A VM's LLDP, STP or LACP describes
 * its link, which ends at the bridge (which forwards no 01:80:c2:00:00:0x); EAPOL, RSN pre-authentication
 * and 802.11 encapsulation (TDLS, fast transition) sent as the station's would be taken by the AP for the
 * station's own; anything else (IPX, AppleTalk, AoE, ...) gets its answers at the station's MAC, which
 * nothing maps back to a VM (IPX even names the VM's MAC as its node address). */
static __always_inline int classify_ethertype(__be16 proto, const struct mac_addr *dst)
{
    if (proto == bpf_htons(ETH_P_IP) || proto == bpf_htons(ETH_P_IPV6) || proto == bpf_htons(ETH_P_ARP))
        return 0;
    const unsigned char *d = dst->addr;
    if ((d[0] == 0x01 && d[1] == 0x80 && d[2] == 0xc2 && !d[3] && !d[4] && !(d[5] & 0xf0)) ||
        proto == bpf_htons(ETH_P_LLDP))
        return MACNAT_CNT_DROP_LINK_LOCAL;
    if (proto == bpf_htons(ETH_P_PPP_DISC) || proto == bpf_htons(ETH_P_PPP_SES) || proto == bpf_htons(ETH_P_WAKE_ON_LAN))
        return 0;
    if (proto == bpf_htons(ETH_P_PAE) || proto == bpf_htons(ETH_P_PREAUTH) || proto == bpf_htons(ETH_P_TDLS))
        return MACNAT_CNT_DROP_STATION_CONTROL;
    return MACNAT_CNT_DROP_ETHERTYPE;
}

/* pppoe[0] when the VM `src` on `port` may do PPPoE now: nobody does, it does, or the VM that did has been
 * silent for MACNAT_PPPOE_IDLE_NS; else NULL. It only reads. */
static __always_inline struct pppoe_owner *pppoe_owner_for(const struct mac_addr *src, __u32 port, __u64 now)
{
    int zero = 0;
    struct pppoe_owner *owner = pppoe.lookup(&zero);
    if (!owner)
        return NULL;
    if (is_zero(owner->mac) || (mac_eq(owner->mac, src->addr) && owner->port == port) ||
        now - owner->last_ns >= MACNAT_PPPOE_IDLE_NS)
        return owner;
    return NULL;
}

/* A PADT (PPPoE Active Discovery Terminate): the session is over. */
static __always_inline int pppoe_terminates(struct __sk_buff *skb)
{
    __u8 code;
    return skb->protocol == bpf_htons(ETH_P_PPP_DISC) && !bpf_skb_load_bytes(skb, PPPOE_CODE_OFF, &code, 1) &&
           code == PPPOE_PADT;
}

static __always_inline void release_pppoe(struct pppoe_owner *owner)
{
    __builtin_memset(owner->mac, 0, 6);
    owner->port = 0;
}

/* The VM's PPPoE frame, vetted: PPPoE is the VM's from now on, until its PADT or its silence. */
static __always_inline void hold_pppoe(struct __sk_buff *skb, struct pppoe_owner *owner, const struct mac_addr *src,
                                       __u32 port, __u64 now)
{
    if (pppoe_terminates(skb)) {
        release_pppoe(owner);
        return;
    }
    __builtin_memcpy(owner->mac, src->addr, 6);
    owner->port = port;
    touch(&owner->last_ns, now);
}

/* ---- VM -> Wi-Fi ----------------------------------------------------------------------------- */

/* What the parse of a VM frame found, for the learning and rewriting that follow. */
struct vm_frame {
    struct ip_addr ip;          /* the source address, bound to the VM when `learn` */
    struct ip_addr dad_target;  /* the address a duplicate address detection probe claims */
    struct dhcp_request_seen dhcp;
    __u32 icmp6_off;            /* an NDP message with link-layer options: where it and they are */
    __u32 ndp_opts_off;
    __u32 l3_end;
    __u8 learn;
    __u8 ipv6;                  /* ip came from an IPv6 header */
    __u8 dad;
    __u8 is_dhcp;
    __u8 rewrite_sha;
    __u8 rewrite_tha;
};

/* Parse and validate a VM frame completely, changing nothing: 0, or -1 for a frame to drop as
 * malformed (a receiver would reject it, or macnat could not rewrite what a receiver reads). */
static __always_inline int parse_vm_frame(struct __sk_buff *skb, struct macnat_config *cfg, __be16 proto,
                                          const struct mac_addr *src, struct vm_frame *f)
{
    if (proto == bpf_htons(ETH_P_ARP)) {
        struct arp_ipv4 *arp = l3_header(skb, ETH_ARP_LEN, NULL);
        if (!arp || !arp_translatable(arp))
            return -1;
        __be32 spa = load_ipv4(arp->spa);
        ipv4_mapped(&f->ip, spa);
        f->learn = spa != 0;  /* 0.0.0.0: an address probe (RFC 5227), nobody's address */
        f->rewrite_sha = vm_mac_inside(arp->sha, src);
        f->rewrite_tha = !is_zero(arp->tha) && vm_mac_inside(arp->tha, src);
        return 0;
    }
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = l3_header(skb, ETH_IP_LEN, NULL);
        if (!iph || iph->version != 4 || iph->ihl < 5)
            return -1;
        __u32 total = bpf_ntohs(iph->tot_len);
        if (total < iph->ihl * 4 || sizeof(struct ethhdr) + total > skb->len)
            return -1;
        f->l3_end = sizeof(struct ethhdr) + total;
        ipv4_mapped(&f->ip, iph->saddr);
        f->learn = iph->saddr != 0;  /* 0.0.0.0: a DHCP client before its lease */
        if (iph->protocol == IPPROTO_UDP && !(iph->frag_off & IP_FRAGMENT_MASK_BE)) {
            /* Only DHCP requests go to the (helper-based) flag rewrite; other UDP stays cheap. */
            __u32 l4_off = sizeof(struct ethhdr) + iph->ihl * 4;
            struct udphdr *udp = (void *)iph + iph->ihl * 4;
            if ((void *)(udp + 1) <= (void *)(long)skb->data_end && udp->dest == DHCP_SERVER_PORT_BE &&
                udp->source == DHCP_CLIENT_PORT_BE)
                if (parse_dhcp_request(skb, l4_off, f->l3_end, &f->dhcp, 1) == 0) {
                    f->is_dhcp = 1;
                    f->dhcp.rewrite = (cfg->flags & MACNAT_CFG_DHCP_REWRITE) &&
                                      dhcp_rewritable(skb, &f->dhcp, src, f->l3_end);
                }
        }
        return 0;
    }
    if (proto != bpf_htons(ETH_P_IPV6))
        return 0;
    struct ipv6hdr *ip6h = l3_header(skb, ETH_IP6_LEN, NULL);
    if (!ip6h || ip6h->version != 6)
        return -1;
    f->l3_end = ETH_IP6_LEN + bpf_ntohs(ip6h->payload_len);
    if (f->l3_end > skb->len)
        return -1;
    __builtin_memcpy(&f->ip, &ip6h->saddr, sizeof(f->ip));
    f->ipv6 = 1;
    f->learn = !ipv6_unspecified(&f->ip);  /* ::: duplicate address detection, MLD before an address */
    __u8 nexthdr = ip6h->nexthdr;
    if (nexthdr != IPPROTO_ICMPV6 && nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
        nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT && nexthdr != IPPROTO_AH)
        return 0;  /* the fast path: TCP, UDP, ... directly after the IPv6 header */
    __u32 l4_off = ETH_IP6_LEN;
    int fragmented = 0;
    int upper = ipv6_upper_layer(skb, nexthdr, &l4_off, f->l3_end, &fragmented);
    if (upper < 0)
        return -1;
    __u8 type;
    if (upper != IPPROTO_ICMPV6 || l4_off + 4 > f->l3_end || bpf_skb_load_bytes(skb, l4_off, &type, 1))
        return 0;
    __u32 options = ndp_options_offset(type);
    if (!options)
        return 0;
    /* RFC 6980: receivers drop fragmented NDP, and macnat could not read the options in later fragments. */
    if (fragmented || l4_off + options > f->l3_end)
        return -1;
    int link_layer_options = ndp_link_layer_options(skb, l4_off + options, f->l3_end);
    if (link_layer_options < 0)
        return -1;
    if (link_layer_options) {
        f->icmp6_off = l4_off;
        f->ndp_opts_off = l4_off + options;
    }
    /* Duplicate address detection (RFC 4862): the VM announces the address it is about to use; it is
     * bound with the probe. */
    f->dad = type == ICMPV6_NEIGHBOUR_SOLICIT && !f->learn &&
             !bpf_skb_load_bytes(skb, l4_off + NDP_TARGET_OFF, &f->dad_target, sizeof(f->dad_target));
    return 0;
}

/* Learn what a vetted VM frame shows; 0, or -1 when it must be dropped (refused, or a table full).
 * Everything is checked before anything is written. */
static __always_inline int learn_vm_frame(struct macnat_config *cfg, struct vm_frame *f, const struct mac_addr *src,
                                          __u32 port, struct binding *known, __u64 now, __u32 len)
{
    struct port_state *state = port_state(port);
    if (!state) {
        count(MACNAT_CNT_DROP_TABLE_FULL);
        return -1;
    }
    struct vm_mac *seen;
    int reason = vet_mac(cfg, src, port, state, &seen);
    if (reason) {
        refuse(cfg, reason, port, src, NULL, NULL, now);
        return -1;
    }
    if (f->learn) {
        reason = vet_claim(cfg, &f->ip, f->ipv6, src, port, state, known);
        if (reason) {
            refuse(cfg, reason, port, src, &f->ip, known ? known->mac : NULL, now);
            return -1;
        }
    }
    if (commit_mac(cfg, src, port, state, seen, now))
        return -1;
    if (f->learn && commit_binding(cfg, &f->ip, src, port, state, known, now, 1, len)) {
        if (!seen)
            vm_macs.delete((struct mac_addr *)src);
        return -1;
    }
    if (f->dad) {
        /* A refused claim by DAD is recorded, but the probe goes on: the host, the LAN host or the VM
         * that has the address defends it, and the prober learns it may not have it. */
        struct binding *target = bindings.lookup(&f->dad_target);
        if (target && mac_eq(target->mac, src->addr) && target->port == port)
            touch(&target->last_seen_ns, now);
        else if ((reason = vet_claim(cfg, &f->dad_target, 1, src, port, state, target)))
            refuse(cfg, reason, port, src, &f->dad_target, target ? target->mac : NULL, now);
        else
            commit_binding(cfg, &f->dad_target, src, port, state, target, now, 0, 0);
    }
    return 0;
}

static __always_inline int drop(__u32 counter)
{
    count(counter);
    return TC_ACT_SHOT;
}

/* Everything the bridge sends towards the LAN: from the VMs. */
int uplink_egress(struct __sk_buff *skb)
{
    struct macnat_config *cfg = get_config();
    if (!cfg || !cfg->wifi_ifindex)
        return TC_ACT_SHOT;

    /* The bridge port the frame entered by: the VM's (skb_iif survives the bridge's forwarding). Frames
     * macnat itself put into the bridge (from Wi-Fi, or from the host, which has no ingress interface)
     * come back here when the bridge floods them: they are not the VMs'. */
    __u32 port = skb->ingress_ifindex;
    if (port == 0 || port == cfg->wifi_ifindex)
        return drop(MACNAT_CNT_DROP_ECHO);
    /* One untagged LAN: a 3-address station has no VLANs, and a tag would hide ARP, NDP and DHCP from
     * the translation (a vlan-aware bridge hands the tag over out of band, in skb->vlan_present). */
    if (skb->vlan_present)
        return drop(MACNAT_CNT_DROP_VLAN);
    if (!pull(skb, sizeof(struct ethhdr)))
        return drop(MACNAT_CNT_DROP_MALFORMED);
    struct ethhdr *eth = (void *)(long)skb->data;
    struct mac_addr src, dst;
    __builtin_memcpy(src.addr, eth->h_source, 6);
    __builtin_memcpy(dst.addr, eth->h_dest, 6);
    __be16 proto = eth->h_proto;

    if (is_group(src.addr) || is_zero(src.addr))
        return drop(MACNAT_CNT_DROP_MALFORMED);
    if (is_vm_mac(&dst))  /* unknown unicast between VMs, flooded: the bridge delivered it */
        return drop(MACNAT_CNT_DROP_VM_TO_VM);
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD) || proto == bpf_htons(ETH_P_QINQ_OLD))
        return drop(MACNAT_CNT_DROP_VLAN);
    /* 802.3 with a length: the AP turns an LLC/SNAP payload (ARP or IPv6 inside) into Ethernet II,
     * with the VM's MAC in it untranslated. Nothing a VM needs on the LAN travels this way. */
    if (bpf_ntohs(proto) < ETH_P_802_3_MIN)
        return drop(MACNAT_CNT_DROP_LLC);
    int verdict = classify_ethertype(proto, &dst);
    if (verdict)
        return drop(verdict);
    int pppoe = proto == bpf_htons(ETH_P_PPP_DISC) || proto == bpf_htons(ETH_P_PPP_SES);

    struct vm_frame f = {};
    if (parse_vm_frame(skb, cfg, proto, &src, &f))
        return drop(MACNAT_CNT_DROP_MALFORMED);

    __u64 now = bpf_ktime_get_coarse_ns();
    struct pppoe_owner *pppoe_owner = pppoe ? pppoe_owner_for(&src, port, now) : NULL;
    if (pppoe && !pppoe_owner) {
        refuse(cfg, MACNAT_CNT_REFUSED_PPPOE, port, &src, NULL, NULL, now);
        return TC_ACT_SHOT;
    }
    struct binding *known = f.learn ? bindings.lookup(&f.ip) : NULL;
    if (known && mac_eq(known->mac, src.addr) && known->port == port) {
        /* The fast path: a binding implies its MAC is in vm_macs on this port (learned first, never
         * aged while bound), so only the binding is refreshed. */
        touch(&known->last_seen_ns, now);
        __sync_fetch_and_add(&known->tx_packets, 1);
        __sync_fetch_and_add(&known->tx_bytes, skb->len);
    } else if (learn_vm_frame(cfg, &f, &src, port, known, now, skb->len)) {
        return TC_ACT_SHOT;
    }
    int dhcp_tracked = 0;
    if (f.is_dhcp) {
        __u8 flags = f.dhcp.rewrite ? MACNAT_DHCP_REWRITTEN |
                                      (f.dhcp.options.client_id_off ? 0 : MACNAT_DHCP_CLIENT_ID_ADDED) : 0;
        dhcp_tracked = remember_dhcp_request(cfg, &f.dhcp, &src, port, now, flags);
    }
    if (pppoe)
        hold_pppoe(skb, pppoe_owner, &src, port, now);

    if (mac_eq(dst.addr, cfg->wifi_mac)) {
        count(MACNAT_CNT_VM_TO_HOST);
        return bpf_redirect(cfg->wifi_ifindex, BPF_F_INGRESS);
    }
    /* The host hears a VM's broadcast as the VM sent it (its own MAC), so it answers the VM. */
    if (is_group(dst.addr))
        bpf_clone_redirect(skb, cfg->wifi_ifindex, BPF_F_INGRESS);

    if (f.ndp_opts_off)
        rewrite_ndp_options(skb, cfg, f.icmp6_off, f.ndp_opts_off, f.l3_end, &src);
    if (f.rewrite_sha)
        bpf_skb_store_bytes(skb, ARP_SHA_OFF, cfg->wifi_mac, 6, 0);
    if (f.rewrite_tha)
        bpf_skb_store_bytes(skb, ARP_THA_OFF, cfg->wifi_mac, 6, 0);
    if (f.is_dhcp) {
        set_dhcp_broadcast(skb, &f.dhcp);
        /* An xid not remembered leaves as it came: its answer would have no VM to go back to. */
        if ((cfg->flags & MACNAT_CFG_DHCP_REWRITE) &&
            !(f.dhcp.rewrite && dhcp_tracked && rewrite_dhcp_request(skb, cfg, &f.dhcp, &src) == 0))
            count(MACNAT_CNT_DHCP_NOT_REWRITTEN);
    }
    /* The helpers above may have moved the data: find the header again, then write in place. */
    eth = (void *)(long)skb->data;
    if ((void *)(eth + 1) > (void *)(long)skb->data_end)
        return drop(MACNAT_CNT_DROP_MALFORMED);
    __builtin_memcpy(eth->h_source, cfg->wifi_mac, 6);
    count(MACNAT_CNT_VM_TO_WIFI);
    skb->mark |= MACNAT_MARK_FROM_VMS;  /* for wifi_egress, which the redirect runs next */
    return bpf_redirect(cfg->wifi_ifindex, 0);
}

/* ---- Wi-Fi -> VMs ---------------------------------------------------------------------------- */

/* A LAN host showed itself in ARP or NDP: note its MAC (for the bridge's FDB, and so that no VM can
 * take it) and the address it uses (so that no VM can claim it). An address bound to a VM stays
 * bound: the conflict is counted and reported, and the LAN's use noted for when the VM lets the
 * address go. */
static __always_inline void note_lan_host(struct macnat_config *cfg, const struct mac_addr *src,
                                          const struct ip_addr *ip, __u64 now)
{
    struct lan_mac *mac = lan_macs.lookup((struct mac_addr *)src);
    if (mac) {
        touch(&mac->last_seen_ns, now);
    } else {
        struct lan_mac fresh_mac = { .last_seen_ns = now };
        if (lan_macs.insert((struct mac_addr *)src, &fresh_mac) == 0)
            count(MACNAT_CNT_LEARNED_LAN_MAC);  /* the manager installs its FDB entry */
    }
    if (!ip || !lan_unicast(ip))
        return;
    struct lan_addr *seen = lan_addrs.lookup((struct ip_addr *)ip);
    if (seen) {
        touch(&seen->last_seen_ns, now);
        return;
    }
    struct binding *vm = bindings.lookup((struct ip_addr *)ip);
    if (vm) {
        count(MACNAT_CNT_LAN_IP_CONFLICT);
        emit(cfg, MACNAT_CNT_LAN_IP_CONFLICT, vm->port, src->addr, vm->mac, ip, now);
    }
    struct lan_addr fresh = { .last_seen_ns = now };
    __builtin_memcpy(fresh.mac, src->addr, 6);
    lan_addrs.insert((struct ip_addr *)ip, &fresh);
}

/* The sender of an ARP request or reply from the LAN. */
static __always_inline void watch_lan_arp(struct __sk_buff *skb, struct macnat_config *cfg, const struct mac_addr *src)
{
    struct arp_ipv4 arp;
    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &arp, sizeof(arp)) || !arp_translatable(&arp))
        return;
    struct ip_addr spa;
    ipv4_mapped(&spa, load_ipv4(arp.spa));
    note_lan_host(cfg, src, &spa, bpf_ktime_get_coarse_ns());
}

/* Neighbour discovery from the LAN: the sender (and an advertisement's target) are noted as the
 * LAN's. A LAN host probing a VM's address (DAD, from ::) wants to take it: the learned binding goes,
 * and if the VM is still there it defends the address with an advertisement, which binds it again; a
 * VM that is gone leaves the address to the newcomer. Never for a static binding, never for ::/8
 * (the IPv4 keys). */
static __always_inline void watch_lan_ndp(struct __sk_buff *skb, struct macnat_config *cfg, const struct mac_addr *src)
{
    struct ipv6hdr ip6h;
    __u8 type;
    struct ip_addr target, saddr;

    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip6h, sizeof(ip6h)) || ip6h.nexthdr != IPPROTO_ICMPV6 ||
        bpf_skb_load_bytes(skb, ETH_IP6_LEN, &type, 1) || !ndp_options_offset(type))
        return;
    __u64 now = bpf_ktime_get_coarse_ns();
    __builtin_memcpy(&saddr, &ip6h.saddr, sizeof(saddr));
    if (!ipv6_unspecified(&saddr))
        note_lan_host(cfg, src, &saddr, now);
    if ((type != ICMPV6_NEIGHBOUR_SOLICIT && type != ICMPV6_NEIGHBOUR_ADVERT) ||
        bpf_skb_load_bytes(skb, ETH_IP6_LEN + NDP_TARGET_OFF, &target, sizeof(target)) || ipv6_reserved(&target))
        return;
    if (type == ICMPV6_NEIGHBOUR_ADVERT) {
        note_lan_host(cfg, src, &target, now);
        return;
    }
    if (!ipv6_unspecified(&saddr))
        return;
    struct binding *vm = bindings.lookup(&target);
    if (!vm || (vm->flags & MACNAT_BINDING_STATIC))
        return;
    unsigned char owner[6];
    __u32 port = vm->port;
    __builtin_memcpy(owner, vm->mac, 6);
    bindings.delete(&target);
    count(MACNAT_CNT_DAD_CONFLICT);
    emit(cfg, MACNAT_CNT_DAD_CONFLICT, port, owner, src->addr, &target, now);
}

/* ARP and NDP from the LAN. The VMs' own frames reach wifi_ingress too (their group frames cloned to
 * the host, their frames for the host redirected): a source MAC that is a VM's, or the Wi-Fi's own
 * (reflected by the AP), is not the LAN's, and its DAD probe is no LAN host's. */
static __always_inline void watch_lan(struct __sk_buff *skb, struct macnat_config *cfg, const struct mac_addr *src)
{
    if (is_group(src->addr) || is_zero(src->addr) || mac_eq(src->addr, cfg->wifi_mac) ||
        vm_macs.lookup((struct mac_addr *)src))
        return;
    if (skb->protocol == bpf_htons(ETH_P_ARP))
        watch_lan_arp(skb, cfg, src);
    else if (skb->protocol == bpf_htons(ETH_P_IPV6))
        watch_lan_ndp(skb, cfg, src);
}

/* Copy a group frame to the VMs (through the bridge) and let the host have it too. A VM's own
 * group frame, handed to the host by uplink_egress, already reached the other VMs. On the way, a
 * DHCPACK answering a VM's request (broadcast, thanks to the flag uplink_egress set) binds its
 * address. */
static __always_inline int to_vms_and_host(struct __sk_buff *skb, struct macnat_config *cfg)
{
    bpf_clone_redirect(skb, cfg->bridge_ifindex, 0);
    count(MACNAT_CNT_GROUP_TO_VMS);
    return TC_ACT_OK;
}

static __always_inline int to_vm(struct __sk_buff *skb, struct macnat_config *cfg, struct binding *vm)
{
    __sync_fetch_and_add(&vm->rx_packets, 1);
    __sync_fetch_and_add(&vm->rx_bytes, skb->len);
    count(MACNAT_CNT_WIFI_TO_VM);
    return bpf_redirect(cfg->bridge_ifindex, 0);
}

/* A unicast frame for a VM that no address binding names (a DHCP reply, PPPoE): to `vm`'s MAC. */
static __always_inline int to_vm_by_mac(struct __sk_buff *skb, struct macnat_config *cfg, const struct mac_addr *vm)
{
    struct ethhdr *eth;
    if (!l3_header(skb, sizeof(struct ethhdr), &eth))
        return TC_ACT_OK;
    __builtin_memcpy(eth->h_dest, vm->addr, 6);
    count(MACNAT_CNT_WIFI_TO_VM);
    return bpf_redirect(cfg->bridge_ifindex, 0);
}

static __always_inline int to_host(void)
{
    count(MACNAT_CNT_WIFI_TO_HOST);
    return TC_ACT_OK;
}

/* Unicast to the station for the address `dst`: to the VM it is bound to, or to the host. */
static __always_inline int to_bound_vm_or_host(struct __sk_buff *skb, struct macnat_config *cfg, struct ethhdr *eth,
                                               struct ip_addr *dst)
{
    struct binding *vm = bindings.lookup(dst);
    if (vm) {
        __builtin_memcpy(eth->h_dest, vm->mac, 6);
        return to_vm(skb, cfg, vm);
    }
    return to_host();
}

/* PPPoE from the LAN to the station: the VM that does PPPoE has it (a PADT ends its turn), else the host. */
static __always_inline int pppoe_to_vm(struct __sk_buff *skb, struct macnat_config *cfg)
{
    int zero = 0;
    struct pppoe_owner *owner = pppoe.lookup(&zero);
    if (!owner || is_zero(owner->mac))
        return to_host();
    struct mac_addr vm;
    __builtin_memcpy(vm.addr, owner->mac, 6);
    if (pppoe_terminates(skb))
        release_pppoe(owner);
    count(MACNAT_CNT_PPPOE_TO_VM);
    return to_vm_by_mac(skb, cfg, &vm);
}

static __always_inline void restore_group(struct ethhdr *eth, const unsigned char *group)
{
    __builtin_memcpy(eth->h_dest, group, 6);
    count(MACNAT_CNT_GROUP_RESTORED);
}

#define GROUP_RESTORED -1   /* wifi_unicast(): the frame was a group frame an AP sent as unicast */
#define DHCP_TO_STATION -2  /* ... a DHCP reply (UDP 67 -> 68) to the station: dhcp_reply() says whose */

/* Whether the UDP datagram after an IPv4 header of `ihl` words goes to the DHCP client port from the
 * server port: read in place where the header is in the linear data (nearly always), else copied. */
static __always_inline int udp_to_dhcp_client(struct __sk_buff *skb, __u32 ihl)
{
    __u32 l4_off = sizeof(struct ethhdr) + ihl * 4;
    struct udphdr *udp = (void *)(long)skb->data + l4_off;
    struct udphdr copy;
    if ((void *)(udp + 1) > (void *)(long)skb->data_end) {
        if (bpf_skb_load_bytes(skb, l4_off, &copy, sizeof(copy)))
            return 0;
        udp = &copy;
    }
    return udp->dest == DHCP_CLIENT_PORT_BE && udp->source == DHCP_SERVER_PORT_BE;
}

/* A unicast frame from the AP to the station: to a VM (by its address binding, or PPPoE's) or to the host;
 * GROUP_RESTORED for a group frame an AP turned into unicast, its group address restored; DHCP_TO_STATION
 * for a DHCP reply. *watch is set for ARP and ICMPv6, for watch_lan(). */
static __always_inline int wifi_unicast(struct __sk_buff *skb, struct macnat_config *cfg, int *watch)
{
    static const unsigned char broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    struct ethhdr *eth;
    struct ip_addr dst;
    if (skb->protocol == bpf_htons(ETH_P_ARP)) {
        *watch = 1;
        struct arp_ipv4 *arp = l3_header(skb, ETH_ARP_LEN, &eth);
        if (!arp || !arp_translatable(arp))
            return to_host();  /* not ARP macnat translates: the host may make of it what it can */
        ipv4_mapped(&dst, load_ipv4(arp->tpa));
        if (host_addrs.lookup(&dst))
            return to_host();
        struct binding *vm = bindings.lookup(&dst);
        if (vm) {
            if (mac_eq(arp->tha, cfg->wifi_mac))
                __builtin_memcpy(arp->tha, vm->mac, 6);
            __builtin_memcpy(eth->h_dest, vm->mac, 6);
            return to_vm(skb, cfg, vm);
        }
        /* ARP for an address nobody here owns, sent to the station's MAC: a broadcast the AP
         * turned into unicast, or a defence against a VM's address probe. Every VM may need it. */
        restore_group(eth, broadcast);
        return GROUP_RESTORED;
    }
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = l3_header(skb, ETH_IP_LEN, &eth);
        if (!iph)
            return TC_ACT_OK;
        __be32 daddr = iph->daddr;
        if (daddr == 0xffffffff) {
            restore_group(eth, broadcast);
            return GROUP_RESTORED;
        }
        if ((bpf_ntohl(daddr) & 0xf0000000) == 0xe0000000) {
            /* RFC 1112: 01:00:5e and the low 23 bits of the group address. */
            unsigned char group[6] = { 0x01, 0x00, 0x5e, ((unsigned char *)&daddr)[1] & 0x7f,
                                       ((unsigned char *)&daddr)[2], ((unsigned char *)&daddr)[3] };
            restore_group(eth, group);
            return GROUP_RESTORED;
        }
        if (iph->protocol == IPPROTO_UDP && !(iph->frag_off & IP_FRAGMENT_MASK_BE) && udp_to_dhcp_client(skb, iph->ihl))
            return DHCP_TO_STATION;
        ipv4_mapped(&dst, daddr);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6h = l3_header(skb, ETH_IP6_LEN, &eth);
        if (!ip6h)
            return TC_ACT_OK;
        __builtin_memcpy(&dst, &ip6h->daddr, sizeof(dst));
        if (ipv6_multicast(&dst)) {
            /* RFC 2464: 33:33 and the low 32 bits of the group address. */
            unsigned char group[6] = { 0x33, 0x33 };
            __builtin_memcpy(group + 2, &dst.addr[3], 4);
            restore_group(eth, group);
            return GROUP_RESTORED;
        }
        if (ipv6_reserved(&dst))  /* ::ffff:a.b.c.d is an IPv4 key: IPv6 never goes by it */
            return to_host();
        *watch = ip6h->nexthdr == IPPROTO_ICMPV6;  /* NUD and other NDP to the station */
    } else if (skb->protocol == bpf_htons(ETH_P_PPP_DISC) || skb->protocol == bpf_htons(ETH_P_PPP_SES)) {
        return pppoe_to_vm(skb, cfg);
    } else {
        return to_host();
    }
    return to_bound_vm_or_host(skb, cfg, eth, &dst);
}

/* Frames from the access point. */
int wifi_ingress(struct __sk_buff *skb)
{
    struct macnat_config *cfg = get_config();
    if (!cfg || !cfg->bridge_ifindex || !pull(skb, sizeof(struct ethhdr)))
        return TC_ACT_OK;
    struct ethhdr *eth = (void *)(long)skb->data;
    struct mac_addr src;
    __builtin_memcpy(src.addr, eth->h_source, 6);

    int verdict = GROUP_RESTORED, watch = 1;
    if (!is_group(eth->h_dest)) {
        if (!mac_eq(eth->h_dest, cfg->wifi_mac))
            return TC_ACT_OK;
        watch = 0;
        verdict = wifi_unicast(skb, cfg, &watch);
    }
    /* One call site each: they are large once inlined. What wifi_unicast rewrote (the destination MAC,
     * an ARP target MAC) is nothing they read; a redirect takes effect on return. */
    if (watch)
        watch_lan(skb, cfg, &src);
    if (verdict != GROUP_RESTORED && verdict != DHCP_TO_STATION)
        return verdict;
    /* A VM's own frame, handed to the host by uplink_egress: a group frame of it already reached the VMs. */
    if (vm_macs.lookup(&src))
        return TC_ACT_OK;
    struct mac_addr vm;
    int answered = DHCP_NOT_A_VMS;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        __u32 l3_end = 0;
        __u32 l4_off = ipv4_udp_offset(skb, &l3_end);
        if (l4_off)
            answered = dhcp_reply(skb, cfg, &src, l4_off, l3_end, &vm);
    }
    if (answered == DHCP_DROP)
        return TC_ACT_SHOT;
    if (verdict == GROUP_RESTORED)
        return to_vms_and_host(skb, cfg);
    if (answered == DHCP_FOR_VM)
        return to_vm_by_mac(skb, cfg, &vm);
    struct ethhdr *unicast;
    struct iphdr *iph = l3_header(skb, ETH_IP_LEN, &unicast);
    if (!iph)
        return TC_ACT_OK;
    struct ip_addr dst;
    ipv4_mapped(&dst, iph->daddr);
    return to_bound_vm_or_host(skb, cfg, unicast, &dst);
}

/* The host's own frames on their way out: those for a VM go into the bridge instead. */
int wifi_egress(struct __sk_buff *skb)
{
    /* A VM's frame uplink_egress translated and redirected here: nothing more to do. The bit stays:
     * wlan0's qdisc may tell the VMs' traffic by it. */
    if (skb->mark & MACNAT_MARK_FROM_VMS)
        return TC_ACT_OK;
    struct macnat_config *cfg = get_config();
    if (!cfg || !cfg->bridge_ifindex || !pull(skb, sizeof(struct ethhdr)))
        return TC_ACT_OK;
    struct ethhdr *eth = (void *)(long)skb->data;

    if (is_group(eth->h_dest)) {
        /* Only the host's own (no ingress interface): VM broadcasts already reached the VMs. */
        if (skb->ingress_ifindex == 0) {
            if (skb->protocol == bpf_htons(ETH_P_IP))
                note_host_dhcp_request(skb, cfg);
            bpf_clone_redirect(skb, cfg->bridge_ifindex, 0);
            count(MACNAT_CNT_GROUP_TO_VMS);
        }
        return TC_ACT_OK;
    }
    struct mac_addr dst;
    __builtin_memcpy(dst.addr, eth->h_dest, 6);
    if (is_vm_mac(&dst)) {
        count(MACNAT_CNT_HOST_TO_VM);
        return bpf_redirect(cfg->bridge_ifindex, 0);
    }
    return TC_ACT_OK;
}
