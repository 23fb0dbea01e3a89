"""Tells systemd how the service is (sd_notify(3)): READY=1 once the datapath forwards, STATUS= with
what it is doing, RELOADING=1/READY=1 around a reload, STOPPING=1, and WATCHDOG=1 when asked.

The protocol is a datagram to the AF_UNIX socket named in $NOTIFY_SOCKET (a leading '@' is the
abstract namespace); systemd documents it as stable, so no library is needed. Without
$NOTIFY_SOCKET (not under systemd) this duty does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from macnat.manager import events
from macnat.manager.duties import Duty

log = logging.getLogger("macnat")


def notify_socket_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


class Notify(Duty):
    def __init__(self):
        self.address = notify_socket_address()
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if self.address else None
        self.ready = False
        self.status: str | None = None
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog = (int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() and int(watchdog_usec) > 0
                         and watchdog_pid in ("", str(os.getpid())) else None)
        self.next_ping = time.monotonic()

    def send(self, *assignments: str) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def handle(self, event, state) -> None:
        if isinstance(event, events.Stopping):
            self.send("STOPPING=1", "STATUS=detaching")
            return
        if isinstance(event, events.Reloaded):
            self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            self.send("READY=1")
        self.update(state)

    def update(self, state) -> None:
        status = state.summary()
        messages = []
        if not self.ready and (state.attached or state.stepped_aside):  # stepped aside is doing its job too
            self.ready = True
            messages.append("READY=1")
        if status != self.status:
            self.status = status
            messages.append(f"STATUS={status}")
        if messages:
            self.send(*messages)

    def due(self) -> float | None:
        return self.next_ping if self.socket else None

    def on_timer(self, now: float, state) -> None:
        # The counts in STATUS change without events; the watchdog wants a ping at half its interval.
        self.next_ping = now + min(self.watchdog or 5.0, 5.0)
        if self.watchdog:
            self.send("WATCHDOG=1")
        self.update(state)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
