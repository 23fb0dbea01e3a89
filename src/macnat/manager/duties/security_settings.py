"""Writes the settings' per-port limits and address policy into config[0] (at start and on reload).

The loader leaves them zero, which the datapath reads as its defaults (constants.PORT_MAX_*).
"""

from __future__ import annotations

from macnat import constants, plumbing
from macnat.manager import events
from macnat.manager.duties import Duty

POLICY_FLAGS = constants.CFG_ALLOW_IPV4_LINK_LOCAL | constants.CFG_ALLOW_DOCUMENTATION


class SecuritySettings(Duty):
    def handle(self, event, state) -> None:
        if isinstance(event, (events.Started, events.Reloaded)):
            settings = state.settings
            flags = (state.maps.current_config().flags & ~POLICY_FLAGS) \
                | (constants.CFG_ALLOW_IPV4_LINK_LOCAL if settings.allow_ipv4_link_local else 0) \
                | (constants.CFG_ALLOW_DOCUMENTATION if settings.allow_documentation else 0)
            plumbing.update_config(state.maps, max_macs_per_port=settings.macs_per_port,
                                   max_ipv4_per_port=settings.ipv4_per_port,
                                   max_ipv6_per_port=settings.ipv6_per_port, flags=flags)
