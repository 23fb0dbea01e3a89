"""A learned binding moves from one VM to another only when its owner is gone.

The datapath refuses a VM's frame that claims another VM's address and records the claim
(refusals, reason refused_claim, with the owner's MAC). Here the owner is probed with a unicast ARP
request or neighbour solicitation from the Wi-Fi interface; if within OWNER_ANSWER_S no frame of
the owner's refreshed the binding, it is deleted, and the claimant's next frame binds the address.
An owner that answers keeps it. (A DHCPACK answering the claimant's own request moves it at once,
in the datapath.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from macnat import constants
from macnat.clock import monotonic_ns
from macnat.logs import event
from macnat.manager import events
from macnat.manager.duties import Periodic
from macnat.manager.probes import Prober
from macnat.maps import ip_key, ip_str, mac_str

log = logging.getLogger("macnat")
OWNER_ANSWER_S = 2.0


@dataclass
class PendingProbe:
    owner: bytes
    claimant: bytes
    sent_ns: int


class Claims(Periodic):
    def __init__(self, answer_s: float = OWNER_ANSWER_S):
        super().__init__(interval=0.5)
        self.answer_ns = answer_s * 1e9
        self.seen: dict[str, tuple[int, int]] = {}     # ip -> (count, last_ns) of its claim record
        self.pending: dict[str, PendingProbe] = {}
        self.claims: int | None = None
        self.prober = Prober()

    def run(self, now: float, state) -> None:
        claims = state.maps.counter_total("refused_claim")
        if claims != self.claims:
            self.claims = claims
            self.probe_new_claims(state)
        if self.pending:
            self.judge(state, monotonic_ns())

    def probe_new_claims(self, state) -> None:
        records = {}
        for key, refusal in state.maps.refusals.items():
            if refusal.reason != constants.COUNTER_INDEX["refused_claim"]:
                continue
            ip = ip_str(key)
            records[ip] = (refusal.count, refusal.last_ns)
            if self.seen.get(ip) == records[ip] or ip in self.pending:
                continue
            binding = state.maps.bindings.lookup(key)
            if binding is None or bytes(binding.mac) != bytes(refusal.owner) or binding.flags & constants.BINDING_STATIC:
                continue
            self.pending[ip] = PendingProbe(bytes(refusal.owner), bytes(refusal.mac), monotonic_ns())
            self.prober.probe(state, ip, bytes(binding.mac))
        self.seen = records

    def judge(self, state, now_ns: int) -> None:
        released = []
        for ip, pending in list(self.pending.items()):
            if now_ns - pending.sent_ns < self.answer_ns:
                continue
            del self.pending[ip]
            binding = state.maps.bindings.lookup(ip_key(ip))
            if binding is None or bytes(binding.mac) != pending.owner:
                continue  # gone or moved meanwhile (a DHCPACK, ageing)
            owner, claimant = mac_str(pending.owner), mac_str(pending.claimant)
            if binding.last_seen_ns >= pending.sent_ns:
                event("claim_refused", f"VM {claimant} claims {ip}, which VM {owner} has and still answers for: kept",
                      level=logging.WARNING, ip=ip, mac=claimant, owner=owner)
            else:
                state.maps.bindings.delete(ip_key(ip))
                released.append(ip)
                event("claim_granted", f"VM {claimant} claims {ip} from VM {owner}, which did not answer its probe: "
                      "released", level=logging.WARNING, ip=ip, mac=claimant, owner=owner)
        if released:
            state.post(events.BindingsRemoved(tuple(released)))

    def close(self) -> None:
        self.prober.close()
