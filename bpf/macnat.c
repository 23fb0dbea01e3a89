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
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/udp.h>

#include "macnat.h"

#define ARPHRD_ETHER_BE bpf_htons(1)
#define BOOTP_BROADCAST_BE bpf_htons(0x8000)
#define BOOTP_FLAGS_OFF 10      /* op, htype, hlen, hops, xid[4], secs[2], flags[2] */
#define DHCP_SERVER_PORT_BE bpf_htons(67)
#define DHCP_CLIENT_PORT_BE bpf_htons(68)
#define IP_FRAGMENT_MASK_BE bpf_htons(0x3fff)  /* MF flag and fragment offset */

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
#define NDP_MAX_OPTIONS 8

/* RFC 826 ARP for IPv4 over Ethernet, the only kind macnat rewrites. */
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

#define ETH_ARP_LEN (sizeof(struct ethhdr) + sizeof(struct arp_ipv4))
#define ETH_IP_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr))
#define ETH_IP6_LEN (sizeof(struct ethhdr) + sizeof(struct ipv6hdr))
#define ARP_SHA_OFF (sizeof(struct ethhdr) + offsetof(struct arp_ipv4, sha))
#define ARP_THA_OFF (sizeof(struct ethhdr) + offsetof(struct arp_ipv4, tha))
#define ARP_TPA_OFF (sizeof(struct ethhdr) + offsetof(struct arp_ipv4, tpa))

BPF_ARRAY(config, struct macnat_config, 1);
BPF_PERCPU_ARRAY(counters, __u64, MACNAT_NUM_COUNTERS);
BPF_HASH(bindings, struct ip_addr, struct binding, MACNAT_MAX_BINDINGS);
BPF_HASH(vm_macs, struct mac_addr, struct mac_seen, MACNAT_MAX_VM_MACS);
/* vm_hints[h(mac)] is set once a VM MAC hashing to h is learned: a clear slot proves a MAC is not a
 * VM's without the cost of hashing it into vm_macs (an array access is inlined by the verifier).
 * Slots are never cleared: a stale or shared one only costs the vm_macs lookup it would have saved. */
BPF_ARRAY(vm_hints, __u8, MACNAT_VM_HINT_SLOTS);
BPF_TABLE("lru_hash", struct mac_addr, struct mac_seen, lan_macs, MACNAT_MAX_LAN_MACS);
BPF_HASH(host_addrs, struct ip_addr, __u8, MACNAT_MAX_HOST_ADDRS);
BPF_TABLE("lru_hash", struct ip_addr, struct refusal, refusals, MACNAT_MAX_REFUSALS);

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

static __always_inline int mac_eq(const unsigned char *a, const unsigned char *b)
{
    return *(const __u32 *)a == *(const __u32 *)b && *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline int is_group(const unsigned char *mac)
{
    return mac[0] & 1;
}

static __always_inline int is_zero(const unsigned char *mac)
{
    return !(*(const __u32 *)mac | *(const __u16 *)(mac + 4));
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

static __always_inline int usable_ipv4(__be32 ip)
{
    /* 0.0.0.0 (DHCP, ARP probes), limited broadcast and multicast never belong to a VM. */
    return ip != 0 && ip != 0xffffffff && (bpf_ntohl(ip) & 0xf0000000) != 0xe0000000;
}

static __always_inline int ipv6_unspecified(const struct ip_addr *a)
{
    return !(a->addr[0] | a->addr[1] | a->addr[2] | a->addr[3]);
}

static __always_inline int ipv6_multicast(const struct ip_addr *a)
{
    return (bpf_ntohl(a->addr[0]) >> 24) == 0xff;
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

static __always_inline void note_lan_mac(const unsigned char *addr, __u64 now)
{
    struct mac_addr mac;
    __builtin_memcpy(mac.addr, addr, 6);
    struct mac_seen *seen = lan_macs.lookup(&mac);
    if (seen) {
        touch(&seen->last_seen_ns, now);
        return;
    }
    struct mac_seen fresh = { .last_seen_ns = now };
    lan_macs.update(&mac, &fresh);
}

static __always_inline void refuse(struct ip_addr *ip, const struct mac_addr *mac, __u16 reason, __u64 now)
{
    count(reason);
    struct refusal *seen = refusals.lookup(ip);
    if (seen && mac_eq(seen->mac, mac->addr) && seen->reason == reason) {
        __sync_fetch_and_add(&seen->count, 1);
        seen->last_ns = now;
        return;
    }
    struct refusal fresh = { .reason = reason, .count = 1, .last_ns = now };
    __builtin_memcpy(fresh.mac, mac->addr, 6);
    refusals.update(ip, &fresh);
}

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

/* Remember a MAC behind the bridge. 0, or -1 when the table is full (the frame is dropped). */
static __always_inline int learn_mac(const struct mac_addr *mac, __u64 now)
{
    struct mac_seen *seen = vm_macs.lookup((struct mac_addr *)mac);
    if (seen) {
        touch(&seen->last_seen_ns, now);
        return 0;
    }
    struct mac_seen fresh = { .last_seen_ns = now };
    if (vm_macs.update((struct mac_addr *)mac, &fresh)) {
        count(MACNAT_CNT_DROP_TABLE_FULL);
        return -1;
    }
    __u32 slot = hint_slot(mac->addr);
    __u8 *hint = vm_hints.lookup(&slot);
    if (hint)
        *hint = 1;
    count(MACNAT_CNT_LEARNED_MAC);
    return 0;
}

/* (Re)bind ip to mac, given what bindings held for it. 0, or -1 when the address is refused. */
static __always_inline int bind_ip(struct ip_addr *ip, const struct mac_addr *mac, __u64 now, struct binding *known,
                                   __u64 packets, __u64 bytes)
{
    if (host_addrs.lookup(ip)) {
        refuse(ip, mac, MACNAT_CNT_REFUSED_HOST_IP, now);
        return -1;
    }
    if (known && (known->flags & MACNAT_BINDING_STATIC)) {
        refuse(ip, mac, MACNAT_CNT_REFUSED_STATIC, now);
        return -1;
    }
    struct binding fresh = { .last_seen_ns = now, .tx_packets = packets, .tx_bytes = bytes };
    __builtin_memcpy(fresh.mac, mac->addr, 6);
    if (bindings.update(ip, &fresh)) {
        count(MACNAT_CNT_DROP_TABLE_FULL);
        return -1;
    }
    count(known ? MACNAT_CNT_MOVED_IP : MACNAT_CNT_LEARNED_IP);
    return 0;
}

/* Bind an address a VM sends from to its MAC. 0, or -1 when the frame must be dropped. */
static __always_inline int learn_ip(struct ip_addr *ip, const struct mac_addr *mac, __u64 now, __u32 len)
{
    struct binding *known = bindings.lookup(ip);
    if (known && mac_eq(known->mac, mac->addr)) {
        touch(&known->last_seen_ns, now);
        __sync_fetch_and_add(&known->tx_packets, 1);
        __sync_fetch_and_add(&known->tx_bytes, len);
        return 0;
    }
    return bind_ip(ip, mac, now, known, 1, len);
}

/* A VM's DHCP request gets the BOOTP broadcast flag, so the server's answer is a broadcast that
 * the AP delivers: a unicast reply would be addressed to the VM's MAC, which the AP never sends to
 * the station. The UDP checksum is updated incrementally (RFC 1624); a zero checksum (none) stays
 * zero, and a CHECKSUM_PARTIAL skb keeps its pseudo-header sum for the device to finish. */
static __always_inline void set_dhcp_broadcast(struct __sk_buff *skb, __u32 l4_off)
{
    struct udphdr udp;
    __u8 op;
    __be16 flags;

    if (bpf_skb_load_bytes(skb, l4_off, &udp, sizeof(udp)) ||
        udp.source != DHCP_CLIENT_PORT_BE || udp.dest != DHCP_SERVER_PORT_BE)
        return;
    __u32 bootp = l4_off + sizeof(udp);
    if (bpf_skb_load_bytes(skb, bootp, &op, 1) || op != 1 ||
        bpf_skb_load_bytes(skb, bootp + BOOTP_FLAGS_OFF, &flags, 2) || (flags & BOOTP_BROADCAST_BE))
        return;
    __be16 with_broadcast = flags | BOOTP_BROADCAST_BE;
    bpf_l4_csum_replace(skb, l4_off + offsetof(struct udphdr, check), flags, with_broadcast,
                        BPF_F_MARK_MANGLED_0 | sizeof(flags));
    bpf_skb_store_bytes(skb, bootp + BOOTP_FLAGS_OFF, &with_broadcast, sizeof(with_broadcast), 0);
    count(MACNAT_CNT_DHCP_FLAG_SET);
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

#define BOOTP_OPTIONS_OFF 240   /* 236 bytes of fixed fields, then the 4-byte magic cookie */
#define DHCP_OPT_PAD 0
#define DHCP_OPT_END 255
#define DHCP_OPT_MESSAGE_TYPE 53
#define DHCP_ACK 5
#define DHCP_MAX_OPTIONS_SCANNED 16

/* A server's DHCPACK to one of the VMs binds the leased address at once: the VM is reachable from
 * the LAN before it has sent anything from that address. */
static __always_inline void learn_from_dhcp_ack(struct __sk_buff *skb, __u32 l4_off)
{
    struct udphdr udp;
    struct bootp_head head;

    if (bpf_skb_load_bytes(skb, l4_off, &udp, sizeof(udp)) ||
        udp.source != DHCP_SERVER_PORT_BE || udp.dest != DHCP_CLIENT_PORT_BE)
        return;
    __u32 bootp = l4_off + sizeof(udp);
    if (bpf_skb_load_bytes(skb, bootp, &head, sizeof(head)) || head.op != 2 || head.htype != 1 ||
        head.hlen != 6 || !usable_ipv4(head.yiaddr))
        return;
    struct mac_addr mac;
    __builtin_memcpy(mac.addr, head.chaddr, 6);
    if (!vm_macs.lookup(&mac))
        return;

    __u32 off = bootp + BOOTP_OPTIONS_OFF;
    for (int i = 0; i < DHCP_MAX_OPTIONS_SCANNED; i++) {
        __u8 option[3];
        if (bpf_skb_load_bytes(skb, off, option, 1))
            return;
        if (option[0] == DHCP_OPT_PAD) {
            off += 1;
            continue;
        }
        if (option[0] == DHCP_OPT_END || bpf_skb_load_bytes(skb, off, option, 3))
            return;
        if (option[0] == DHCP_OPT_MESSAGE_TYPE) {
            if (option[1] == 1 && option[2] == DHCP_ACK) {
                __u64 now = bpf_ktime_get_coarse_ns();
                struct ip_addr yiaddr;
                ipv4_mapped(&yiaddr, head.yiaddr);
                struct binding *known = bindings.lookup(&yiaddr);
                if (known && mac_eq(known->mac, mac.addr))
                    touch(&known->last_seen_ns, now);
                else
                    bind_ip(&yiaddr, &mac, now, known, 0, 0);
            }
            return;
        }
        off += 2 + option[1];
    }
}

/* Offset of the UDP header of an unfragmented IPv4/UDP frame, or 0. */
static __always_inline __u32 ipv4_udp_offset(struct __sk_buff *skb)
{
    struct iphdr iph;
    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &iph, sizeof(iph)) || iph.ihl < 5 ||
        iph.protocol != IPPROTO_UDP || (iph.frag_off & IP_FRAGMENT_MASK_BE))
        return 0;
    return sizeof(struct ethhdr) + iph.ihl * 4;
}

/* Where the options of an NDP message of this type start, relative to the ICMPv6 header; 0 when the
 * type carries no link-layer address options. */
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

/* Source/Target Link-Layer Address options carrying a VM's MAC get the Wi-Fi MAC, wherever they
 * stand among the options; the ICMPv6 checksum is updated by the difference over each 8-byte option
 * (the pseudo-header does not change). -1 for a malformed option list (RFC 4861 4.6: length 0). */
static __always_inline int rewrite_ndp_options(struct __sk_buff *skb, struct macnat_config *cfg, __u32 l4_off,
                                               __u32 off, const struct mac_addr *src)
{
    for (int i = 0; i < NDP_MAX_OPTIONS; i++) {
        __u8 option[8];
        if (off + 2 > skb->len)
            return 0;
        if (bpf_skb_load_bytes(skb, off, option, 2))
            return -1;
        if (option[1] == 0)
            return -1;
        if ((option[0] == ND_OPT_SOURCE_LL || option[0] == ND_OPT_TARGET_LL) && option[1] == 1) {
            if (bpf_skb_load_bytes(skb, off, option, sizeof(option)))
                return -1;
            struct mac_addr carried;
            __builtin_memcpy(carried.addr, option + 2, 6);
            if (mac_eq(carried.addr, src->addr) || vm_macs.lookup(&carried)) {
                __u8 rewritten[8];
                __builtin_memcpy(rewritten, option, 2);
                __builtin_memcpy(rewritten + 2, cfg->wifi_mac, 6);
                __s64 diff = bpf_csum_diff((__be32 *)option, sizeof(option), (__be32 *)rewritten,
                                           sizeof(rewritten), 0);
                bpf_l4_csum_replace(skb, l4_off + ICMPV6_CSUM_OFF, 0, diff, 0);
                bpf_skb_store_bytes(skb, off + 2, cfg->wifi_mac, 6, 0);
                count(MACNAT_CNT_NDP_REWRITTEN);
            }
        }
        off += option[1] * 8;
    }
    return 0;
}

/* Everything the bridge sends towards the LAN: from the VMs. */
int uplink_egress(struct __sk_buff *skb)
{
    struct macnat_config *cfg = get_config();
    if (!cfg || !cfg->wifi_ifindex)
        return TC_ACT_SHOT;

    /* Frames macnat itself put into the bridge (from Wi-Fi, or from the host, which has no
     * ingress interface) come back here when the bridge floods them: they are not the VMs'. */
    if (skb->ingress_ifindex == 0 || skb->ingress_ifindex == cfg->wifi_ifindex) {
        count(MACNAT_CNT_DROP_ECHO);
        return TC_ACT_SHOT;
    }
    if (!pull(skb, sizeof(struct ethhdr))) {
        count(MACNAT_CNT_DROP_MALFORMED);
        return TC_ACT_SHOT;
    }
    struct ethhdr *eth = (void *)(long)skb->data;
    struct mac_addr src, dst;
    __builtin_memcpy(src.addr, eth->h_source, 6);
    __builtin_memcpy(dst.addr, eth->h_dest, 6);
    __be16 proto = eth->h_proto;

    if (is_group(src.addr) || is_zero(src.addr)) {
        count(MACNAT_CNT_DROP_MALFORMED);
        return TC_ACT_SHOT;
    }
    if (is_vm_mac(&dst)) {  /* unknown unicast between VMs, flooded: the bridge delivered it */
        count(MACNAT_CNT_DROP_VM_TO_VM);
        return TC_ACT_SHOT;
    }
    int rewrite_sha = 0, rewrite_tha = 0, learn = 0;
    __u32 udp_off = 0, icmp6_off = 0, ndp_opts_off = 0;
    struct ip_addr ip, dad_target;
    int dad = 0;
    if (proto == bpf_htons(ETH_P_ARP)) {
        struct arp_ipv4 *arp = l3_header(skb, ETH_ARP_LEN, NULL);
        if (!arp || arp->htype != ARPHRD_ETHER_BE || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 ||
            arp->plen != 4) {
            count(MACNAT_CNT_DROP_MALFORMED);
            return TC_ACT_SHOT;
        }
        __be32 spa = load_ipv4(arp->spa);
        ipv4_mapped(&ip, spa);
        learn = usable_ipv4(spa);
        rewrite_sha = mac_eq(arp->sha, src.addr);
        rewrite_tha = mac_eq(arp->tha, src.addr);
    } else if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = l3_header(skb, ETH_IP_LEN, NULL);
        if (!iph || iph->ihl < 5) {
            count(MACNAT_CNT_DROP_MALFORMED);
            return TC_ACT_SHOT;
        }
        ipv4_mapped(&ip, iph->saddr);
        learn = usable_ipv4(iph->saddr);
        if (iph->protocol == IPPROTO_UDP && !(iph->frag_off & IP_FRAGMENT_MASK_BE)) {
            /* Only DHCP requests go to the (helper-based) flag rewrite; other UDP stays cheap. */
            struct udphdr *udp = (void *)iph + iph->ihl * 4;
            if ((void *)(udp + 1) <= (void *)(long)skb->data_end && udp->dest == DHCP_SERVER_PORT_BE &&
                udp->source == DHCP_CLIENT_PORT_BE)
                udp_off = sizeof(struct ethhdr) + iph->ihl * 4;
        }
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6h = l3_header(skb, ETH_IP6_LEN, NULL);
        if (!ip6h) {
            count(MACNAT_CNT_DROP_MALFORMED);
            return TC_ACT_SHOT;
        }
        __builtin_memcpy(&ip, &ip6h->saddr, sizeof(ip));
        learn = !ipv6_unspecified(&ip) && !ipv6_multicast(&ip);
        if (ip6h->nexthdr == IPPROTO_ICMPV6)
            icmp6_off = ETH_IP6_LEN;
    }
    if (icmp6_off) {
        __u8 type;
        if (bpf_skb_load_bytes(skb, icmp6_off, &type, 1) == 0) {
            __u32 options = ndp_options_offset(type);
            ndp_opts_off = options ? icmp6_off + options : 0;
            /* Duplicate address detection (RFC 4862): the VM announces the address it is about
             * to use; it is bound below. */
            dad = type == ICMPV6_NEIGHBOUR_SOLICIT && ipv6_unspecified(&ip) &&
                  !bpf_skb_load_bytes(skb, icmp6_off + NDP_TARGET_OFF, &dad_target, sizeof(dad_target)) &&
                  !ipv6_unspecified(&dad_target) && !ipv6_multicast(&dad_target);
        }
    }

    __u64 now = bpf_ktime_get_coarse_ns();
    struct binding *known = learn ? bindings.lookup(&ip) : NULL;
    if (known && mac_eq(known->mac, src.addr)) {
        /* The fast path: a binding implies its MAC is in vm_macs (learned first, never aged while
         * bound), so only the binding is refreshed. */
        touch(&known->last_seen_ns, now);
        __sync_fetch_and_add(&known->tx_packets, 1);
        __sync_fetch_and_add(&known->tx_bytes, skb->len);
    } else {
        if (learn_mac(&src, now))
            return TC_ACT_SHOT;
        if (learn && bind_ip(&ip, &src, now, known, 1, skb->len))
            return TC_ACT_SHOT;
        /* A claim of the host's address by DAD is refused, but the probe goes on, so the host
         * can defend its address and the VM learns it may not have it. */
        if (dad)
            learn_ip(&dad_target, &src, now, skb->len);
    }

    if (mac_eq(dst.addr, cfg->wifi_mac)) {
        count(MACNAT_CNT_VM_TO_HOST);
        return bpf_redirect(cfg->wifi_ifindex, BPF_F_INGRESS);
    }
    /* The host hears a VM's broadcast as the VM sent it (its own MAC), so it answers the VM. */
    if (is_group(dst.addr))
        bpf_clone_redirect(skb, cfg->wifi_ifindex, BPF_F_INGRESS);

    if (ndp_opts_off && rewrite_ndp_options(skb, cfg, icmp6_off, ndp_opts_off, &src)) {
        count(MACNAT_CNT_DROP_MALFORMED);
        return TC_ACT_SHOT;
    }
    if (rewrite_sha)
        bpf_skb_store_bytes(skb, ARP_SHA_OFF, cfg->wifi_mac, 6, 0);
    if (rewrite_tha)
        bpf_skb_store_bytes(skb, ARP_THA_OFF, cfg->wifi_mac, 6, 0);
    if (udp_off)
        set_dhcp_broadcast(skb, udp_off);
    /* The helpers above may have moved the data: find the header again, then write in place. */
    eth = (void *)(long)skb->data;
    if ((void *)(eth + 1) > (void *)(long)skb->data_end) {
        count(MACNAT_CNT_DROP_MALFORMED);
        return TC_ACT_SHOT;
    }
    __builtin_memcpy(eth->h_source, cfg->wifi_mac, 6);
    count(MACNAT_CNT_VM_TO_WIFI);
    return bpf_redirect(cfg->wifi_ifindex, 0);
}

/* Neighbour solicitations from the LAN for a VM's address. A LAN host asking gets its answer by
 * unicast: its MAC is noted for the bridge's FDB. A LAN host probing the address (DAD, from ::)
 * wants to take it: the binding goes, and if the VM is still there it defends the address with an
 * advertisement, which binds it again; a VM that is gone leaves the address to the newcomer. */
static __always_inline void watch_solicitation(struct __sk_buff *skb, const struct mac_addr *src)
{
    struct ipv6hdr ip6h;
    __u8 type;
    struct ip_addr target, saddr;

    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip6h, sizeof(ip6h)) || ip6h.nexthdr != IPPROTO_ICMPV6 ||
        bpf_skb_load_bytes(skb, ETH_IP6_LEN, &type, 1) || type != ICMPV6_NEIGHBOUR_SOLICIT ||
        bpf_skb_load_bytes(skb, ETH_IP6_LEN + NDP_TARGET_OFF, &target, sizeof(target)))
        return;
    struct binding *vm = bindings.lookup(&target);
    if (!vm)
        return;
    __builtin_memcpy(&saddr, &ip6h.saddr, sizeof(saddr));
    if (!ipv6_unspecified(&saddr)) {
        note_lan_mac(src->addr, bpf_ktime_get_coarse_ns());
    } else if (!(vm->flags & MACNAT_BINDING_STATIC)) {
        bindings.delete(&target);
        count(MACNAT_CNT_DAD_CONFLICT);
    }
}

/* Copy a group frame to the VMs (through the bridge) and let the host have it too. A VM's own
 * group frame, handed to the host by uplink_egress, already reached the other VMs. On the way:
 * a DHCPACK for a VM (broadcast, thanks to the flag uplink_egress set) binds its address, and
 * LAN hosts asking for a VM are noted. */
static __always_inline int to_vms_and_host(struct __sk_buff *skb, struct macnat_config *cfg,
                                           const struct mac_addr *src)
{
    if (vm_macs.lookup((struct mac_addr *)src))
        return TC_ACT_OK;
    if (skb->protocol == bpf_htons(ETH_P_ARP)) {
        struct ip_addr tpa;
        ipv4_mapped(&tpa, 0);
        if (!bpf_skb_load_bytes(skb, ARP_TPA_OFF, &tpa.addr[3], 4) && bindings.lookup(&tpa))
            note_lan_mac(src->addr, bpf_ktime_get_coarse_ns());
    } else if (skb->protocol == bpf_htons(ETH_P_IP)) {
        __u32 l4_off = ipv4_udp_offset(skb);
        if (l4_off)
            learn_from_dhcp_ack(skb, l4_off);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        watch_solicitation(skb, src);
    }
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

static __always_inline void restore_group(struct ethhdr *eth, const unsigned char *group)
{
    __builtin_memcpy(eth->h_dest, group, 6);
    count(MACNAT_CNT_GROUP_RESTORED);
}

/* Frames from the access point. */
int wifi_ingress(struct __sk_buff *skb)
{
    static const unsigned char broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    struct macnat_config *cfg = get_config();
    if (!cfg || !cfg->bridge_ifindex || !pull(skb, sizeof(struct ethhdr)))
        return TC_ACT_OK;
    struct ethhdr *eth = (void *)(long)skb->data;
    struct mac_addr src;
    __builtin_memcpy(src.addr, eth->h_source, 6);

    if (is_group(eth->h_dest))
        return to_vms_and_host(skb, cfg, &src);
    if (!mac_eq(eth->h_dest, cfg->wifi_mac))
        return TC_ACT_OK;

    struct ip_addr dst;
    if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
        struct arp_ipv4 *arp = l3_header(skb, ETH_ARP_LEN, &eth);
        if (!arp || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 || arp->plen != 4)
            return TC_ACT_OK;
        ipv4_mapped(&dst, load_ipv4(arp->tpa));
        if (host_addrs.lookup(&dst)) {
            count(MACNAT_CNT_WIFI_TO_HOST);
            return TC_ACT_OK;
        }
        note_lan_mac(src.addr, bpf_ktime_get_coarse_ns());
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
        return to_vms_and_host(skb, cfg, &src);
    }
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = l3_header(skb, ETH_IP_LEN, &eth);
        if (!iph)
            return TC_ACT_OK;
        __be32 daddr = iph->daddr;
        if (daddr == 0xffffffff) {
            restore_group(eth, broadcast);
            return to_vms_and_host(skb, cfg, &src);
        }
        if ((bpf_ntohl(daddr) & 0xf0000000) == 0xe0000000) {
            /* RFC 1112: 01:00:5e and the low 23 bits of the group address. */
            unsigned char group[6] = { 0x01, 0x00, 0x5e, ((unsigned char *)&daddr)[1] & 0x7f,
                                       ((unsigned char *)&daddr)[2], ((unsigned char *)&daddr)[3] };
            restore_group(eth, group);
            return to_vms_and_host(skb, cfg, &src);
        }
        ipv4_mapped(&dst, daddr);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6h = l3_header(skb, ETH_IP6_LEN, &eth);
        if (!ip6h)
            return TC_ACT_OK;
        __builtin_memcpy(&dst, &ip6h->daddr, sizeof(dst));
        if (ipv6_multicast(&dst)) {
            /* RFC 2464: 33:33 and the low 32 bits of the group address. */
            unsigned char group[6] = { 0x33, 0x33 };
            __builtin_memcpy(group + 2, &dst.addr[3], 4);
            restore_group(eth, group);
            return to_vms_and_host(skb, cfg, &src);
        }
        if (ip6h->nexthdr == IPPROTO_ICMPV6 && bindings.lookup(&dst))
            note_lan_mac(src.addr, bpf_ktime_get_coarse_ns());  /* NUD and other NDP to a VM */
    } else {
        count(MACNAT_CNT_WIFI_TO_HOST);
        return TC_ACT_OK;
    }
    struct binding *vm = bindings.lookup(&dst);
    if (vm) {
        __builtin_memcpy(eth->h_dest, vm->mac, 6);
        return to_vm(skb, cfg, vm);
    }
    count(MACNAT_CNT_WIFI_TO_HOST);
    return TC_ACT_OK;
}

/* The host's own frames on their way out: those for a VM go into the bridge instead. */
int wifi_egress(struct __sk_buff *skb)
{
    struct macnat_config *cfg = get_config();
    if (!cfg || !cfg->bridge_ifindex || !pull(skb, sizeof(struct ethhdr)))
        return TC_ACT_OK;
    struct ethhdr *eth = (void *)(long)skb->data;

    if (is_group(eth->h_dest)) {
        /* Only the host's own (no ingress interface): VM broadcasts already reached the VMs. */
        if (skb->ingress_ifindex == 0) {
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
