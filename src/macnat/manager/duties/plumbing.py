"""Keeps the attachment whole while the system changes under it.

The Wi-Fi interface and the bridge are followed by name: the programs belong on whatever interface is
called WIFI now (a re-plugged dongle comes back with a new ifindex, maybe a new MAC), and the uplink
belongs in whatever bridge is called BRIDGE (Proxmox's `ifreload -a` takes unlisted ports out of
bridges; a bridge can be deleted and created again). Each change is repaired with the programs the
manager holds, so nothing is compiled and no binding is lost; while the Wi-Fi interface is away
config[0] names no interface, so nothing is redirected to an ifindex that no longer exists.
"""

from __future__ import annotations

import logging
import time

from macnat import constants, loader, netlink, plumbing
from macnat.errors import MacnatError
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Duty
from macnat.maps import mac_str

log = logging.getLogger("macnat")


class Plumbing(Duty):
    # Every change this duty repairs comes as an event, and lost events come as an Overrun (the
    # kernel reports ENOBUFS); the reconcile on a timer is only the last resort, so it is rare:
    # an idle laptop's manager should cost next to nothing.
    HEALTH_INTERVAL = 60.0

    def __init__(self):
        self.next_check = time.monotonic() + self.HEALTH_INTERVAL
        self.refused: set[tuple[str, int]] = set()   # (name, index) refused once, not logged again
        self.attached_once = False                   # so a later attach is "back", not "here"

    def due(self) -> float:
        return self.next_check

    def on_timer(self, now: float, state) -> None:
        self.next_check = now + self.HEALTH_INTERVAL
        self.reconcile(state)

    def handle(self, event, state) -> None:
        if isinstance(event, (events.Started, events.Reloaded, events.Overrun)):
            self.reconcile(state)
        elif isinstance(event, events.LinkChanged) and self.concerns(event.link, state):
            self.reconcile(state)
        elif isinstance(event, events.FiltersChanged) and event.index in self.indices(state):
            self.reconcile(state)
        elif isinstance(event, events.Stopping):
            self.detach(state)

    @staticmethod
    def indices(state) -> set[int]:
        return {lk.index for lk in (state.wifi, state.bridge, state.uplink) if lk}

    def concerns(self, link: netlink.Link, state) -> bool:
        return link.name in (state.wifi_name, state.settings.bridge, *plumbing.uplink_names(state.wifi_name)) \
            or link.index in self.indices(state)

    def usable(self, link: netlink.Link | None, check) -> netlink.Link | None:
        """`link` if macnat can use it; an unusable one is logged once (per ifindex) and treated as absent."""
        if link is None:
            return None
        try:
            check(link)
        except MacnatError as exc:
            if (link.name, link.index) not in self.refused:
                self.refused.add((link.name, link.index))
                log.error("%s; waiting for that to change", exc)
            return None
        return link

    # ---- the reconcile ---------------------------------------------------------------------
    def reconcile(self, state) -> None:
        present = {lk.name: lk for lk in netlink.links(state.ipr)}   # one dump for all the lookups
        self.reconcile_wifi(state, present)
        self.reconcile_bridge_side(state, present)

    def reconcile_wifi(self, state, present: dict[str, netlink.Link]) -> None:
        ipr, maps = state.ipr, state.maps
        wifi = self.usable(present.get(state.wifi_name), lambda lk: loader.check_wifi(ipr, lk))
        config = maps.current_config()
        if wifi is None:
            if state.wifi is not None or config.wifi_ifindex:
                self.leave_wifi(state, config)
            return
        if config.wifi_ifindex != wifi.index or plumbing.macnat_hooks(ipr, wifi.index) != set(plumbing.TC_PARENT):
            again = self.attached_once
            created = plumbing.attach_wifi(ipr, wifi.index, state.datapath.programs)
            flags = (config.flags | constants.CFG_CREATED_CLSACT) if created else (config.flags & ~constants.CFG_CREATED_CLSACT)
            old_mac = mac_str(config.wifi_mac)
            plumbing.update_config(maps, wifi_ifindex=wifi.index, wifi_mac=wifi.mac, flags=flags)
            if state.uplink:
                self.move_wifi_fdb(state, old_mac, wifi.mac)
            event("wifi_attached", f"{wifi.name} is {'back' if again else 'here'} (ifindex {wifi.index}, MAC {wifi.mac}): "
                  + ("re-attached; the VMs' bindings are kept" if again else "attached"),
                  wifi=wifi.name, ifindex=wifi.index, mac=wifi.mac, again=again)
            state.wifi = wifi
            self.attached_once = True
            state.post(events.WifiAttached(wifi, again))
            return
        old_mac = mac_str(config.wifi_mac)
        if wifi.mac != old_mac:
            plumbing.update_config(maps, wifi_mac=wifi.mac)
            if state.uplink:
                self.move_wifi_fdb(state, old_mac, wifi.mac)
            event("wifi_mac_changed", f"{wifi.name} changed its MAC from {old_mac} to {wifi.mac}: VM frames now leave "
                  "with the new one", wifi=wifi.name, old_mac=old_mac, mac=wifi.mac)
            state.post(events.WifiMacChanged(old_mac, wifi.mac))
        state.wifi = wifi
        self.attached_once = True

    def leave_wifi(self, state, config) -> None:
        """The Wi-Fi interface is gone (or renamed away): take the programs off what remains of it."""
        previous = netlink.link_by_index(state.ipr, config.wifi_ifindex) if config.wifi_ifindex else None
        if previous is not None:  # renamed: it is not our Wi-Fi interface any more
            plumbing.detach_wifi(state.ipr, previous.index, bool(config.flags & constants.CFG_CREATED_CLSACT))
        plumbing.update_config(state.maps, wifi_ifindex=0, flags=config.flags & ~constants.CFG_CREATED_CLSACT)
        how = f"renamed to {previous.name}" if previous is not None else "gone"
        event("wifi_gone", f"{state.wifi_name} is {how}: the VMs cannot reach the LAN until it is back; their "
              "bindings are kept", level=logging.WARNING, wifi=state.wifi_name, renamed_to=previous.name if previous else None)
        state.wifi = None
        state.post(events.WifiLost(state.wifi_name))

    def move_wifi_fdb(self, state, old: str, new: str) -> None:
        # VM frames for the host must go to the uplink only, never be flooded to the other VMs.
        if old != new:
            netlink.fdb_del(state.ipr, state.uplink.index, old)
        netlink.fdb_set(state.ipr, state.uplink.index, new)

    def reconcile_bridge_side(self, state, present: dict[str, netlink.Link]) -> None:
        ipr, maps = state.ipr, state.maps
        bridge_name = state.settings.bridge
        bridge = self.usable(present.get(bridge_name), loader.check_bridge)
        config = maps.current_config()
        port_name, peer_name = plumbing.uplink_names(state.wifi_name)
        uplink, peer = present.get(port_name), present.get(peer_name)
        changed = False
        if bridge is None:
            if state.bridge is not None or config.bridge_ifindex:
                plumbing.update_config(maps, bridge_ifindex=0)
                event("bridge_gone", f"{bridge_name} is gone: the VMs are cut off from the LAN until it is back",
                      level=logging.WARNING, bridge=bridge_name)
                state.post(events.BridgeLost(bridge_name))
            state.bridge, state.uplink = None, uplink
            return
        ready = state.bridge is None or state.bridge.index != bridge.index
        if uplink is None or peer is None:
            for half in (uplink, peer):
                if half is not None:
                    plumbing.remove_uplink(ipr, half.index)
            uplink = plumbing.create_uplink(ipr, state.wifi_name, bridge)
            plumbing.attach_uplink(ipr, uplink.index, state.datapath.programs)
            plumbing.set_up(ipr, uplink)
            changed = True
            if config.uplink_ifindex:
                event("uplink_repaired", f"re-created the uplink {port_name} in {bridge_name} (it had been deleted)",
                      level=logging.WARNING, uplink=port_name, bridge=bridge_name, repair="re-created")
            ready = True
        else:
            if "egress" not in plumbing.macnat_hooks(ipr, uplink.index):
                plumbing.attach_uplink(ipr, uplink.index, state.datapath.programs)
                event("uplink_repaired", f"put uplink_egress back on {port_name} (its filter had been removed)",
                      level=logging.WARNING, uplink=port_name, repair="filter")
            if uplink.master != bridge.index or uplink.mtu != bridge.mtu:
                plumbing.enslave(ipr, uplink, bridge)
                changed = True
                if uplink.master != bridge.index:
                    why = "" if uplink.master else ", as `ifreload -a` does with ports it does not know"
                    event("uplink_repaired", f"put {port_name} back into {bridge_name} (it had been taken out{why})",
                          level=logging.WARNING, uplink=port_name, bridge=bridge_name, repair="re-enslaved")
                    ready = True
            if not uplink.up and state.stepped_aside is None:
                plumbing.set_up(ipr, uplink)
                changed = True
        if changed:
            uplink = netlink.link(ipr, port_name)
        bridge_ifindex = 0 if state.stepped_aside else bridge.index  # see duties.docking
        if config.bridge_ifindex != bridge_ifindex or config.uplink_ifindex != uplink.index:
            plumbing.update_config(maps, bridge_ifindex=bridge_ifindex, uplink_ifindex=uplink.index)
        state.bridge, state.uplink = bridge, uplink
        if ready:
            netlink.fdb_set(ipr, uplink.index, mac_str(maps.current_config().wifi_mac))
            state.post(events.UplinkReady(uplink, bridge))

    def detach(self, state) -> None:
        config = state.maps.current_config()
        if config.wifi_ifindex:
            plumbing.detach_wifi(state.ipr, config.wifi_ifindex, bool(config.flags & constants.CFG_CREATED_CLSACT))
        for name in plumbing.uplink_names(state.wifi_name):
            found = netlink.find_link(state.ipr, name)
            if found is not None:
                plumbing.remove_uplink(state.ipr, found.index)
                break
        state.wifi = state.uplink = None
