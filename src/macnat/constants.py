"""Every number the datapath and the manager share, in one place; cflags() hands them to the C code."""

from __future__ import annotations

# Per-CPU counters, by index. The C code names them MACNAT_CNT_<UPPER NAME>.
COUNTERS: dict[str, str] = {
    "vm_to_wifi": "VM frames translated and sent out the Wi-Fi interface",
    "wifi_to_vm": "unicast from Wi-Fi translated and delivered to a VM",
    "vm_to_host": "VM frames delivered to the host's own stack",
    "host_to_vm": "host frames delivered to a VM",
    "group_to_vms": "broadcast/multicast from Wi-Fi or the host copied to the VMs",
    "group_restored": "group frames an AP delivered as unicast, restored to their group address",
    "dhcp_flag_set": "DHCP requests given the broadcast flag",
    "ndp_rewritten": "NDP link-layer address options of a VM rewritten to the Wi-Fi MAC",
    "wifi_to_host": "Wi-Fi frames passed to the host untouched",
    "learned_mac": "new VM MACs learned",
    "learned_ip": "new VM address bindings learned (IPv4 and IPv6)",
    "moved_ip": "bindings that moved to another VM MAC",
    "dad_conflict": "LAN hosts probing (DAD) an address bound to a VM: the binding is dropped until the VM defends it",
    "refused_host_ip": "VM frames dropped: they claim an address of the host (a DAD probe goes on, for the host to answer)",
    "refused_static": "VM frames dropped: they claim another VM's static address",
    "drop_echo": "frames macnat injected into the bridge, flooded back to the uplink and dropped",
    "drop_vm_to_vm": "frames between VMs flooded to the uplink, dropped (the bridge delivers them)",
    "drop_malformed": "VM frames dropped as truncated or malformed",
    "drop_table_full": "VM frames dropped because a binding table is full",
}
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}

MAX_BINDINGS = 65536
MAX_VM_MACS = 4096
MAX_LAN_MACS = 4096
MAX_HOST_ADDRS = 256
MAX_REFUSALS = 256
VM_HINT_SLOTS = 4096        # a cheap "certainly not a VM MAC" before the vm_macs lookup

BINDING_STATIC = 1          # set by the user; never aged, never moved by learning
CFG_CREATED_CLSACT = 1      # the loader created wifi's clsact qdisc, so detach may remove it

# cls_bpf filters: an explicit priority and handle, so macnat finds and removes only its own.
TC_PRIO = 0x40DE  # an unusual priority: other tools sharing the clsact keep theirs
TC_HANDLE = 0x1
PROGRAMS = {  # function in bpf/macnat.c -> (device role, hook)
    "wifi_ingress": ("wifi", "ingress"),
    "wifi_egress": ("wifi", "egress"),
    "uplink_egress": ("uplink", "egress"),
}
MAP_NAMES = ("config", "counters", "bindings", "vm_macs", "vm_hints", "lan_macs", "host_addrs", "refusals")


def cflags() -> list[str]:
    flags = {
        "MACNAT_NUM_COUNTERS": len(COUNTERS),
        "MACNAT_MAX_BINDINGS": MAX_BINDINGS,
        "MACNAT_MAX_VM_MACS": MAX_VM_MACS,
        "MACNAT_MAX_LAN_MACS": MAX_LAN_MACS,
        "MACNAT_MAX_HOST_ADDRS": MAX_HOST_ADDRS,
        "MACNAT_MAX_REFUSALS": MAX_REFUSALS,
        "MACNAT_VM_HINT_SLOTS": VM_HINT_SLOTS,
        "MACNAT_BINDING_STATIC": BINDING_STATIC,
        "MACNAT_CFG_CREATED_CLSACT": CFG_CREATED_CLSACT,
    }
    flags.update({f"MACNAT_CNT_{name.upper()}": i for name, i in COUNTER_INDEX.items()})
    return [f"-D{name}={value}" for name, value in flags.items()]
