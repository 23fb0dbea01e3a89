"""The DHCPv4 policy (setting `dhcp`) in the datapath: keep the VMs' chaddr, rewrite it to the Wi-Fi MAC,
or auto: keep on each network until keep fails there, then rewrite.

Keep fails where the network checks that chaddr is the sender's MAC (DHCP snooping's "verify
mac-address", hostapd's proxy ARP): the VMs' DISCOVERs and REQUESTs go unanswered while the server
answers the station's own MAC. The datapath counts the requests and answers of each xid
(dhcp_requests); auto reads them every second. Once VMs' requests have gone unanswered UNANSWERED_TRIES
times, each at least REPLY_WAIT_S old, it looks for proof that the server answers this host: an answered
broadcast request of the host's own (its DHCP client's, kept as port 0), else a DHCPDISCOVER it sends as
the host (chaddr the Wi-Fi's, no client identifier: the server offers and commits to nothing). Answered:
rewrite from now on, until the network changes. Not answered: no server answers anybody, and keep stays.
How long each waiting VM then waited for its first answer is logged.
"""

from __future__ import annotations

import logging
import random
import socket
import time

from macnat import constants, frames, plumbing
from macnat.clock import monotonic_ns
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.maps import DhcpRequest, mac_str, xid_key

log = logging.getLogger("macnat")
REPLY_WAIT_S = 2.0       # a server answers in milliseconds; a request this old without an answer got none
UNANSWERED_TRIES = 2     # unanswered VM requests (retransmissions count) before keep is judged to fail
PROBE_WAIT_S = 3.0       # how long the DHCPDISCOVER sent as the host may take to be answered
PROBE_LOOK_S = 0.2       # the first look for its answer
PROBE_RETRY_S = 30.0     # after an unanswered probe, the next one
DISCOVER, REQUEST = 1, 3  # the DHCP message types that always get an answer from a server that hears them


def unanswered(requests: list[DhcpRequest], now_ns: int) -> list[DhcpRequest]:
    """VMs' DISCOVERs and REQUESTs that had REPLY_WAIT_S for an answer and got none."""
    return [r for r in requests if r.port and r.message in (DISCOVER, REQUEST) and not r.replies
            and now_ns - r.first_ns >= REPLY_WAIT_S * 1e9]


class DhcpPolicy(Periodic):
    def __init__(self):
        super().__init__(interval=1.0)
        self.rewriting = False
        self.since: float | None = None     # time.time() of auto's switch to rewrite
        self.probe: tuple[int, float] | None = None   # (xid, time.monotonic() sent) of the host's DISCOVER
        self.probe_failed_at: float | None = None
        self.waiting: dict[bytes, int] = {}  # VM MAC -> first_ns of its first unanswered request

    # ---- events --------------------------------------------------------------------------------
    def handle(self, event_, state) -> None:
        if isinstance(event_, events.Started):
            adopted = bool(state.maps.current_config().flags & constants.CFG_DHCP_REWRITE)
            self.apply(state, rewriting=state.settings.dhcp == "rewrite" or (state.settings.dhcp == "auto" and adopted))
            if state.settings.dhcp == "auto" and adopted:
                log.info("DHCP (auto): the adopted datapath rewrites chaddr, as the manager before decided")
        elif isinstance(event_, events.Reloaded) and event_.old.dhcp != event_.new.dhcp:
            self.reset()
            self.apply(state, rewriting=state.settings.dhcp == "rewrite")
        elif isinstance(event_, events.NetworkChanged) and state.settings.dhcp == "auto":
            if self.rewriting:
                event("dhcp_policy", f"DHCP (auto): keeping the VMs' chaddr on the new network {event_.new.describe()} "
                      "until keep fails there", policy="auto", mode="keep")
            self.reset()
            self.apply(state, rewriting=False)

    def reset(self) -> None:
        self.since, self.probe, self.probe_failed_at = None, None, None
        self.waiting = {}

    def apply(self, state, rewriting: bool) -> None:
        self.rewriting = rewriting
        flags = state.maps.current_config().flags
        wanted = flags | constants.CFG_DHCP_REWRITE if rewriting else flags & ~constants.CFG_DHCP_REWRITE
        if wanted != flags:
            plumbing.update_config(state.maps, flags=wanted)
        state.dhcp = self.describe(state)

    def describe(self, state) -> str:
        """For `macnat status`: "keep", "rewrite", "auto: keep", "auto: rewrite since 12:01:02"."""
        mode = "rewrite" if self.rewriting else "keep"
        if state.settings.dhcp != "auto":
            return mode
        since = f" since {time.strftime('%H:%M:%S', time.localtime(self.since))}" if self.since else ""
        return f"auto: {mode}{since}"

    # ---- auto ----------------------------------------------------------------------------------
    def run(self, now: float, state) -> None:
        if state.settings.dhcp != "auto" or not state.attached:
            return
        table = list(state.maps.dhcp_requests.items())
        requests = [r for _, r in table]
        now_ns = monotonic_ns()
        if self.rewriting:
            self.log_answered(requests, now_ns)
            return
        silent = unanswered(requests, now_ns)
        tries = sum(r.requests for r in silent)
        if tries < UNANSWERED_TRIES:
            return
        # the host's own answered requests: its DHCP client's broadcasts, or the probe below
        host_answered = {key.value for key, r in table if not r.port and r.replies}
        if host_answered:
            probed = self.probe is not None and xid_key(self.probe[0]).value in host_answered
            self.switch(state, silent, tries, "while the server answered a DHCPDISCOVER sent as this host" if probed
                        else "while the server answers this host's own requests")
        elif self.probe is not None:
            if now - self.probe[1] >= PROBE_WAIT_S:
                self.probe, self.probe_failed_at = None, now
                log.warning("DHCP (auto): %d requests of VMs got no answer, and a DHCPDISCOVER sent as this host got "
                            "none either: no DHCP server answers on this network; keeping the VMs' chaddr", tries)
        elif self.probe_failed_at is None or now - self.probe_failed_at >= PROBE_RETRY_S:
            self.send_probe(state, now)

    def send_probe(self, state, now: float) -> None:
        xid = random.getrandbits(32)
        frame = frames.dhcp_discover(bytes(state.maps.current_config().wifi_mac), xid)
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind((state.wifi.name, 0))
                sock.send(frame)
        except OSError as exc:
            log.warning("DHCP (auto): could not send a DHCPDISCOVER from %s: %s", state.wifi.name, exc)
            self.probe_failed_at = now
            return
        self.probe = (xid, now)
        self.next_at = now + PROBE_LOOK_S
        log.debug("DHCP (auto): VMs' requests go unanswered; asking the server as this host (xid %#010x)", xid)

    def switch(self, state, silent: list[DhcpRequest], tries: int, proof: str) -> None:
        vms = {bytes(r.mac): r.first_ns for r in silent}
        for mac, first_ns in vms.items():
            self.waiting[mac] = min(first_ns, self.waiting.get(mac, first_ns))
        self.since, self.probe = time.time(), None
        waited = (monotonic_ns() - min(vms.values())) / 1e9
        self.apply(state, rewriting=True)
        network = state.network.describe() if state.network else state.wifi_name
        event("dhcp_policy", f"DHCP (auto): rewriting the VMs' chaddr to {state.wifi_name}'s MAC from now on, on "
              f"{network}: {tries} requests of {len(vms)} VM{'s' if len(vms) != 1 else ''} "
              f"({', '.join(mac_str(m) for m in vms)}) got no answer in {waited:.1f} s {proof}; the network checks "
              "chaddr (DHCP snooping)", level=logging.WARNING, policy="auto", mode="rewrite", waited_s=round(waited, 1),
              vms=[mac_str(m) for m in vms])

    def log_answered(self, requests: list[DhcpRequest], now_ns: int) -> None:
        """Each VM that waited when auto switched: how long after its first request it got an answer."""
        for r in requests:
            mac = bytes(r.mac)
            if mac in self.waiting and r.replies and r.flags & constants.DHCP_REWRITTEN:
                waited = (now_ns - self.waiting.pop(mac)) / 1e9
                event("dhcp_answered", f"DHCP (auto): VM {mac_str(mac)} got its answer about {waited:.1f} s after its "
                      "first request", vm=mac_str(mac), waited_s=round(waited, 1))
