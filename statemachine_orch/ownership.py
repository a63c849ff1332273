"""Who drives a run: an owner token plus enough about the process to tell if it died.

A run is owned by exactly one process at a time. A dead owner on this host (killed,
crashed, or from before a reboot) is detected at once from the process table, so a crashed
run can be resumed immediately; an owner on another host is assumed alive (leases across
hosts come with the PostgreSQL store).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Owner:
    token: str
    host: str
    pid: int
    boot_id: str | None
    started: str | None  # process start time in clock ticks since boot (Linux)

    @classmethod
    def for_this_process(cls) -> Owner:
        """A new token, with this process's identity (read once per process, not per run).

        The token fences writes, so it must differ between owners whatever seeds `random`."""
        return cls(os.urandom(16).hex(), *_identity(os.getpid()))

    def info_json(self) -> str:
        return json.dumps({"token": self.token, "host": self.host, "pid": self.pid, "boot_id": self.boot_id,
                           "started": self.started}, separators=(",", ":"))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def owner_from_json(text: str | None) -> Owner | None:
    if not text:
        return None
    try:
        data = json.loads(text)
        return Owner(str(data["token"]), str(data["host"]), int(data["pid"]),
                     data.get("boot_id"), data.get("started"))
    except (ValueError, KeyError, TypeError):
        return None


def is_alive(owner: Owner) -> bool:
    """False only when we are sure the owning process is gone."""
    if owner.host != _identity(os.getpid())[0]:
        return True
    boot = _boot_id()
    if owner.boot_id and boot and owner.boot_id != boot:
        return False  # the machine rebooted since
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(owner.pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False  # zombie: exited, not yet reaped
    return owner.started is None or owner.started == started


@cache
def _identity(pid: int) -> tuple[str, int, str | None, str | None]:
    """(host, pid, boot id, start time) of a process; keyed on the pid so a fork reads its own."""
    import socket  # here: reading commands never need it

    return socket.gethostname(), pid, _boot_id(), _process_start(pid)


@cache
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], fields[19]


def _process_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None
