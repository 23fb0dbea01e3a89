"""The manager's loop: it owns the event sources and the clock, and hands every event to every duty.

One poll over the sources' descriptors, with a timeout until the earliest duty timer; events are
handed to the duties in order, each duty's failure logged without stopping the others (the datapath
forwards on its own whatever the manager does).
"""

from __future__ import annotations

import logging
import select
import time

from macnat import config
from macnat.logs import event
from macnat.manager import events

log = logging.getLogger("macnat")
# Timers due this close together run in one wake-up (they then stay together): an idle manager wakes
# about once a second, not once per duty.
TIMER_SLACK = 0.1


class Loop:
    def __init__(self, state, duties, sources):
        self.state = state
        self.duties = duties
        self.sources = {source.fileno(): source for source in sources}

    def dispatch(self, event) -> None:
        """Hand `event`, then every event the duties post in turn, to every duty."""
        self.state.posted.append(event)
        while self.state.posted:
            current = self.state.posted.popleft()
            if isinstance(current, events.ReloadRequested):
                current = self.reload()
                if current is None:
                    continue
            if isinstance(current, events.Stopping):
                self.state.stopping = True
            for duty in self.duties:
                try:
                    duty.handle(current, self.state)
                except Exception:
                    log.exception("%s failed on %s; the datapath keeps forwarding", type(duty).__name__,
                                  type(current).__name__)

    def reload(self) -> events.Reloaded | None:
        """Read the configuration again; a bad file keeps the running settings."""
        previous = self.state.resolved
        try:
            self.state.resolved = config.reload(previous)
        except config.ConfigError as exc:
            log.error("reload failed, keeping the running settings: %s", exc)
            return None
        changes = previous.settings.changes(self.state.resolved.settings)
        event("reloaded", f"reloaded {previous.path}: "
              + (", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()) or "nothing changed"),
              file=str(previous.path), changed=sorted(changes))
        return events.Reloaded(previous.settings, self.state.resolved.settings)

    def run_timers(self) -> None:
        now = time.monotonic()
        for duty in self.duties:
            due = duty.due()
            if due is not None and due <= now + TIMER_SLACK:
                try:
                    duty.on_timer(now, self.state)
                except Exception:
                    log.exception("%s failed; the datapath keeps forwarding", type(duty).__name__)
        while self.state.posted:  # what the timers posted
            self.dispatch(self.state.posted.popleft())

    def timeout(self) -> float:
        dues = [d for d in (duty.due() for duty in self.duties) if d is not None]
        return max(0.0, min(dues) - time.monotonic()) if dues else 60.0

    def start(self) -> None:
        self.dispatch(events.Started())

    def run(self) -> None:
        """Until Stopping (then the duties detach)."""
        while not self.state.stopping:
            self.run_timers()
            if self.state.stopping:
                break
            ready, _, _ = select.select(list(self.sources), [], [], self.timeout())
            for fd in ready:
                for incoming in self.sources[fd].read():
                    self.dispatch(incoming)
                    if self.state.stopping:
                        break
