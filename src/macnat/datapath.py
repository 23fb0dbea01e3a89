"""A loaded datapath as the manager holds it: its three programs (file descriptors) and its maps.

The manager keeps the programs open for its whole life, not only the filters that run them: when the
Wi-Fi interface is deleted and created again (a dongle re-plugged, a driver reloaded), the filters go
with the old device but the programs and their tables stay, so the manager attaches the same
programs, bindings and all, to the new device without compiling anything. The file descriptors cross
the exec from `macnat attach` into the manager as inherited descriptors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from macnat import bpfsys, constants
from macnat.maps import Maps


@dataclass
class Datapath:
    programs: dict[str, int]   # program name (constants.PROGRAMS) -> file descriptor, owned
    maps: Maps

    @classmethod
    def from_bcc(cls, bpf) -> Datapath:
        """Load the compiled programs; the result owns its descriptors, so the bcc object can be cleaned up."""
        programs = {name: os.dup(bpf.load_func(name.encode(), bpf.SCHED_CLS).fd) for name in constants.PROGRAMS}
        return cls.from_fds(programs)

    @classmethod
    def from_ids(cls, prog_ids: dict[str, int]) -> Datapath:
        """Open running programs by the IDs the kernel reports for them (adopting an attachment)."""
        return cls.from_fds({name: bpfsys.prog_fd_by_id(prog_id) for name, prog_id in prog_ids.items()})

    @classmethod
    def from_fds(cls, programs: dict[str, int]) -> Datapath:
        try:
            maps = Maps.from_prog_fds(list(programs.values()))
        except BaseException:
            for fd in programs.values():
                os.close(fd)
            raise
        return cls(programs, maps)

    def program_ids(self) -> dict[str, int]:
        return {name: bpfsys.prog_info(fd)[0].id for name, fd in self.programs.items()}

    def handover(self) -> dict[str, int]:
        """The program descriptors, made inheritable across exec (the maps are found again from them)."""
        for fd in self.programs.values():
            os.set_inheritable(fd, True)
        return dict(self.programs)

    def close(self) -> None:
        self.maps.close()
        for fd in self.programs.values():
            os.close(fd)
        self.programs = {}
