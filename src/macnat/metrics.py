"""Prometheus metrics of one attachment, named as Prometheus' naming guide says: base units, `_total`
for counters, labels for the dimensions of one thing.

The collector reads the datapath's counters when it is scraped (or when the textfile is written);
table sizes come from the manager's last look at its tables, so a scrape never reads 65,536 bindings.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from macnat import __version__, constants

DROPS = {name: help_ for name, help_ in constants.COUNTERS.items() if name.startswith(("drop_", "refused_"))}
OTHERS = {name: help_ for name, help_ in constants.COUNTERS.items() if name not in DROPS}


def counter_metric_name(counter: str) -> str:
    """learned_ip -> macnat_learned_ip_total; vm_to_wifi -> macnat_vm_to_wifi_frames_total."""
    if counter.startswith(("learned_", "moved_", "dad_", "dhcp_", "ndp_")):
        return f"macnat_{counter}_total"
    return f"macnat_{counter}_frames_total"


class AttachmentCollector(Collector):
    def __init__(self, state):
        self.state = state

    def collect(self):
        state, wifi = self.state, self.state.wifi_name
        totals = state.maps.counter_totals()
        dropped = CounterMetricFamily("macnat_dropped_frames", "Frames the datapath dropped, by reason",
                                      labels=["wifi", "reason"])
        for name in DROPS:
            dropped.add_metric([wifi, name.removeprefix("drop_")], totals.get(name, 0))
        yield dropped
        for name, help_ in OTHERS.items():
            metric = CounterMetricFamily(counter_metric_name(name).removesuffix("_total"), help_[0].upper() + help_[1:],
                                         labels=["wifi"])
            metric.add_metric([wifi], totals.get(name, 0))
            yield metric
        bindings = GaugeMetricFamily("macnat_bindings", "Address bindings of VMs, as of the manager's last look",
                                     labels=["wifi", "family", "kind"])
        for (family, kind), count in sorted(state.binding_counts.items()):
            bindings.add_metric([wifi, family, kind], count)
        yield bindings
        yield self._gauge("macnat_vms", "VM MACs with at least one binding", state.vms)
        yield self._gauge("macnat_lan_macs", "LAN MACs the VMs talk to (static FDB entries on the uplink)",
                          state.lan_macs)
        yield self._gauge("macnat_attached", "1 when the datapath forwards between the Wi-Fi and the bridge",
                          int(state.attached))
        capacity = GaugeMetricFamily("macnat_table_capacity", "Entries each datapath table can hold",
                                     labels=["wifi", "table"])
        for table, size in (("bindings", constants.MAX_BINDINGS), ("vm_macs", constants.MAX_VM_MACS),
                            ("lan_macs", constants.MAX_LAN_MACS)):
            capacity.add_metric([wifi, table], size)
        yield capacity
        network = state.network
        info = InfoMetricFamily("macnat_network", "The Wi-Fi network macnat is on", labels=["wifi"])
        info.add_metric([wifi], {"state": state.phase, "ssid": state.association.ssid or "",
                                 "bssid": state.association.bssid or "",
                                 "subnet": getattr(network, "subnet", None) or "",
                                 "gateway": getattr(network, "gateway", None) or ""})
        yield info
        build = InfoMetricFamily("macnat_build", "The macnat version")
        build.add_metric([], {"version": __version__})
        yield build

    def _gauge(self, name: str, help_: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, help_, labels=["wifi"])
        gauge.add_metric([self.state.wifi_name], value)
        return gauge
