"""Whether a run's owner still lives: a lock the kernel holds for the owner until it dies.

A process that owns runs in a database holds, for as long as it lives, an exclusive lock on
one byte of the `<db>-owners` file: the byte its lock key names. Any process that sees the
file (in another PID or UTS namespace, in a container sharing the volume) can test that byte.
The kernel releases the lock when the owner dies, however it dies, so a free byte proves the
owner gone and a held one proves it alive. A pid or a host name proves nothing across
namespaces; they only judge owners recorded before lock keys existed (a dead pid on this host
is gone, another host is assumed alive, `orch resume --take-over` overrides).

POSIX record locks belong to a process, and closing *any* descriptor of the file drops all of
them; so each process opens an owners file once and keeps the descriptor for its lifetime
(that table is the one piece of process-wide state here, as the locks themselves are).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Literal

from ...errors import StoreError
from ...types import RunStatus
from .._owner import Owner, boot_id, identity, lock_key, owner_from_json, proc_stat

Liveness = Literal["alive", "gone", "unknown"]  # unknown: assumed alive, but not proven

_OPENED: dict[tuple[int, str, bool], int] = {}  # (pid, path, writable) -> descriptor, never closed
_OPENING = threading.Lock()


def owners_file(db: Path) -> Path:
    return Path(f"{db}-owners")


def hold(path: Path, owner: Owner) -> None:
    """Lock `owner`'s byte for the rest of this process's life (before its token is stored).
    An owner without this process's lock key (built by hand) is judged by its pid instead."""
    if owner.lock is None or owner.lock != lock_key(os.getpid()):
        return
    try:
        fd = _descriptor(path, writable=True)
        assert fd is not None
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(owner.lock))  # again: a no-op
    except OSError as exc:
        raise StoreError(f"cannot lock {path}, which tells other processes this one is alive: "
                         f"{exc.strerror or exc}", where=str(path),
                         fix="make the database's directory writable") from exc


def stale(path: Path, status: str, owner_info: str | None) -> bool:
    """Marked running, but its owner is gone: what `orch runs` and `orch show` both say."""
    if status != RunStatus.RUNNING.value:
        return False
    holder = owner_from_json(owner_info)
    return holder is None or not is_alive(path, holder)


def is_alive(path: Path, owner: Owner) -> bool:
    """False only when we are sure the owning process is gone."""
    return liveness(path, owner) != "gone"


def liveness(path: Path, owner: Owner) -> Liveness:
    """Whether `owner` lives: proven by its lock, or judged by pid for owners without one."""
    if owner.lock is None:
        return _by_pid(owner)
    if owner.lock == lock_key(os.getpid()):
        return "alive"  # this process
    fd = _descriptor(path, writable=False)
    if fd is None:
        return _by_pid(owner)  # no owners file to test (deleted by hand)
    offset = _offset(owner.lock)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, offset)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return "alive"  # the owner holds its lock
        raise
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
    return "gone"


def _offset(key: str) -> int:
    return int(key, 16) >> 2  # below 2**62: a valid file offset everywhere


def _descriptor(path: Path, *, writable: bool) -> int | None:
    """This process's descriptor of the owners file (read-write when it can be opened so)."""
    pid = os.getpid()
    name = str(path)
    with _OPENING:
        for key in ((pid, name, True), (pid, name, False)):
            if key in _OPENED and (key[2] or not writable):
                return _OPENED[key]
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT if writable else os.O_RDWR, 0o600)
            _OPENED[pid, name, True] = fd
        except FileNotFoundError:
            return None
        except PermissionError:
            if writable:
                raise
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                return None
            _OPENED[pid, name, False] = fd
        return fd


def _by_pid(owner: Owner) -> Liveness:
    """The judgement for owners without a lock key: gone when its pid on this host is."""
    if owner.host != identity(os.getpid())[0]:
        return "unknown"
    boot = boot_id()
    if owner.boot_id and boot and owner.boot_id != boot:
        return "gone"  # the machine rebooted since
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "unknown"
    stat = proc_stat(owner.pid)
    if stat is None:
        return "unknown"
    state, started = stat
    if state in ("Z", "X"):
        return "gone"  # zombie: exited, not yet reaped
    return "gone" if owner.started is not None and owner.started != started else "unknown"
