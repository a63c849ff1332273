"""Whether a run's owner still lives, judged from this host's process table.

A dead owner on this host (killed, crashed, or from before a reboot) is detected at once, so a
crashed run can be resumed immediately; an owner on another host is assumed alive (runs are
driven from several hosts through the PostgreSQL store and its leases).
"""

from __future__ import annotations

import os

from .._owner import Owner, boot_id, identity, proc_stat


def is_alive(owner: Owner) -> bool:
    """False only when we are sure the owning process is gone."""
    if owner.host != identity(os.getpid())[0]:
        return True
    boot = boot_id()
    if owner.boot_id and boot and owner.boot_id != boot:
        return False  # the machine rebooted since
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = proc_stat(owner.pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False  # zombie: exited, not yet reaped
    return owner.started is None or owner.started == started
