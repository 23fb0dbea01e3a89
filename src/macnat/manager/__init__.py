"""The manager: keeps an attachment right while the datapath forwards on its own.

The datapath learns bindings itself, at line rate and before forwarding the frame that taught it.
The manager does what needs time or the rest of the system, as a small loop (loop.py) over events
(sources.py: rtnetlink, nl80211, signals; and the duties' timers) that hands each event to every duty
(duties/: one module each): following the Wi-Fi interface and the bridge, the host's addresses,
static bindings, the Wi-Fi network and its changes, LAN FDB entries, ageing, logging, the status file
and systemd's notifications. If the manager dies, the datapath keeps forwarding with what it has,
and a new manager adopts it.

`macnat attach` compiles and attaches, then execs `python -m macnat.manager` with the programs'
descriptors and the lock, so neither LLVM nor the CLI's libraries stay resident.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from pyroute2 import IPRoute

from macnat import config, logs
from macnat.attachment import ManagerLock
from macnat.datapath import Datapath

log = logging.getLogger("macnat")


def exec_manager(wifi: str, resolved: config.Resolved, lock: ManagerLock, datapath: Datapath) -> None:
    """Replace this process (same PID, lock and programs inherited) with a lean manager."""
    os.set_inheritable(lock.fd, True)
    handover = {"wifi": wifi, "lock_fd": lock.fd, "programs": datapath.handover(),
                "config": str(resolved.path), "cli": resolved.cli}
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "macnat.manager", json.dumps(handover)])


def main(handover: dict) -> int:
    from macnat.manager import sources
    from macnat.manager.duties import all_duties
    from macnat.manager.loop import Loop
    from macnat.manager.state import State

    wifi = handover["wifi"]
    lock = ManagerLock(wifi, fd=handover["lock_fd"])
    datapath = Datapath.from_fds(handover["programs"])
    try:
        resolved = config.resolve(wifi, handover["cli"], path=Path(handover["config"]))
        logs.setup(resolved.settings.log_format, resolved.settings.verbose)
        state = State(wifi, resolved, datapath, IPRoute(), lock=lock)
        duties = all_duties()
        event_sources = [sources.Rtnetlink(), sources.Signals()]
        nl80211 = sources.Nl80211.available()
        if nl80211:
            event_sources.append(nl80211)
        loop = Loop(state, duties, event_sources)
        try:
            loop.start()
            log.info("managing %s <-> %s (uplink %s); ageing after %.0f s; %s", wifi, resolved.settings.bridge,
                     state.uplink.name if state.uplink else "none yet", resolved.settings.age, state.summary())
            loop.run()
            log.info("detached from %s", wifi)
        finally:
            for item in (*duties, *event_sources):
                item.close()
            state.ipr.close()
    finally:
        datapath.close()
        lock.release()
    return state.exit_code
