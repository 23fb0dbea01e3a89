"""Ages what the datapath learned: idle bindings are probed, then removed; unbound VM MACs go too.

An idle binding is asked with a **unicast** ARP request or neighbour solicitation from the Wi-Fi
interface (power-saving clients ignore broadcast probes); the VM's answer refreshes the binding in
the datapath. A binding silent for the whole `age` is removed. Static bindings never age. While the
Wi-Fi interface is away, down or not associated the VMs cannot reach the LAN (and the host may have no
address to probe from), so nothing expires then, and for one `age` after it is back only probes go
out: every VM gets the time to answer.
"""

from __future__ import annotations

import logging
import time

from macnat import constants
from macnat.clock import monotonic_ns
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.manager.probes import Prober
from macnat.maps import Binding, IpAddr, MacAddr, VmMac, ip_str, mac_str
from macnat.tables import binding_counts

log = logging.getLogger("macnat")
PROBES = 3   # unicast probes an idle binding gets before it expires


class Ageing(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.probed_at: dict[str, float] = {}   # address -> time.monotonic() of its last probe
        self.grace_until = 0.0
        self.wifi_was_unusable = False
        self.prober = Prober()

    def handle(self, event_, state) -> None:
        if isinstance(event_, (events.Started, events.Reloaded)):
            self.interval = self.probe_interval(state)
            self.next_at = time.monotonic()  # the age may have changed: judge every binding again

    @staticmethod
    def probe_interval(state) -> float:
        return max(1.0, state.settings.age / 10)

    def run(self, now: float, state) -> None:
        if state.wifi is None or not (state.wifi.up and state.wifi.carrier):
            self.wifi_was_unusable = True
            return  # nothing can refresh a binding meanwhile: keep them all
        if self.wifi_was_unusable:
            self.wifi_was_unusable = False
            self.grace_until = now + state.settings.age
        expire = now >= self.grace_until
        now_ns = monotonic_ns()
        age_ns = int(state.settings.age * 1e9)
        probe_from_ns = age_ns - int(PROBES * self.interval * 1e9)
        table = state.maps.bindings.snapshot()
        flags, seen = table.field("flags", Binding), table.field("last_seen_ns", Binding)
        macs = table.field("mac", Binding)
        learned = [i for i, f in enumerate(flags) if not f & constants.BINDING_STATIC]
        idle = {i: ip_str(IpAddr.from_buffer_copy(table.key(i))) for i in learned if now_ns - seen[i] >= probe_from_ns}
        source = None  # read once a sweep, when a probe is due
        expired: dict[int, str] = {}
        for i, ip in idle.items():
            idle_ns = now_ns - seen[i]
            if expire and idle_ns >= age_ns:
                state.maps.bindings.delete(IpAddr.from_buffer_copy(table.key(i)))
                expired[i] = ip
                event("expired", f"expired {ip} at {mac_str(macs[i])}: silent for {idle_ns / 1e9:.0f} s",
                      ip=ip, mac=mac_str(macs[i]), idle_s=round(idle_ns / 1e9))
            elif self.probe_due(ip, now):
                source = source or self.prober.source(state)
                self.prober.probe(state, ip, macs[i], source)
                self.probed_at[ip] = now
                log.debug("probing idle %s at %s", ip, mac_str(macs[i]))
        waiting = set(idle.values()) - set(expired.values())   # probed and not answered yet
        self.probed_at = {ip: t for ip, t in self.probed_at.items() if ip in waiting}
        bound = {macs[i] for i in range(table.count) if i not in expired}
        state.bindings, state.vms = table.count - len(expired), len(bound)
        state.binding_counts = binding_counts(table)
        if expired:
            state.post(events.BindingsExpired(tuple(expired.values())))
        if expire:
            vm_macs = state.maps.vm_macs.snapshot()
            for key, last in zip(vm_macs.key_list(), vm_macs.field("last_seen_ns", VmMac)):
                if key not in bound and now_ns - last >= age_ns:
                    state.maps.vm_macs.delete(MacAddr.from_buffer_copy(key))
        if learned and not idle:
            # Nothing can become idle before its last sighting allows: no sweep until the first one may.
            first_idle_ns = min(seen[i] for i in learned) + probe_from_ns
            self.next_at = max(self.next_at, now + (first_idle_ns - now_ns) / 1e9)

    def probe_due(self, ip: str, now: float) -> bool:
        last = self.probed_at.get(ip)
        return last is None or now - last >= self.interval

    def close(self) -> None:
        self.prober.close()
