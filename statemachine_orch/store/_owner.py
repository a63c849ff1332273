"""Who drives a run: an owner token plus enough about the process to tell if it died.

A run is owned by exactly one process at a time; every write is fenced on the owner's token.
The lock key names the lock the owning process holds while it lives, which a store on the same
kernel tests to tell a dead owner from a live one (`sqlite._liveness`); host, pid, boot id and
start time say who it is, and judge owners recorded before lock keys existed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Owner:
    """The process that drives a run: the token that fences its writes, and who it is."""

    token: str
    host: str
    pid: int
    boot_id: str | None
    started: str | None  # process start time in clock ticks since boot (Linux)
    lock: str | None = None  # this process's liveness lock key; None in rows from before schema version 6

    @classmethod
    def for_this_process(cls) -> Owner:
        """A new token, with this process's identity (read once per process, not per run).

        The token fences writes, so it must differ between owners whatever seeds `random`."""
        pid = os.getpid()
        host, pid, boot, started = identity(pid)
        return cls(token=os.urandom(16).hex(), host=host, pid=pid, boot_id=boot, started=started,
                   lock=lock_key(pid))

    def info_json(self) -> str:
        return json.dumps({"token": self.token, "host": self.host, "pid": self.pid, "boot_id": self.boot_id,
                           "started": self.started, "lock": self.lock}, separators=(",", ":"))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def who_am_i(owner: Owner) -> str:
    """The user and process behind `owner` (this process), as an audit row names them."""
    import getpass

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{owner.host} pid {owner.pid}"


def owner_from_json(text: str | None) -> Owner | None:
    if not text:
        return None
    try:
        data = json.loads(text)
        return Owner(token=str(data["token"]), host=str(data["host"]), pid=int(data["pid"]),
                     boot_id=data.get("boot_id"), started=data.get("started"), lock=data.get("lock"))
    except (ValueError, KeyError, TypeError):
        return None


@cache
def identity(pid: int) -> tuple[str, int, str | None, str | None]:
    """(host, pid, boot id, start time) of a process; keyed on the pid so a fork reads its own."""
    import socket  # here: reading commands never need it

    return socket.gethostname(), pid, boot_id(), _process_start(pid)


@cache
def lock_key(pid: int) -> str:
    """This process's liveness lock key (random, 64 bits); keyed on the pid so a fork has its own."""
    return os.urandom(8).hex()


@cache
def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], fields[19]


def _process_start(pid: int) -> str | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None
