"""macnat: VMs behind a Wi-Fi station become full LAN hosts through MAC address translation in TC eBPF."""

__version__ = "0.1.0"
