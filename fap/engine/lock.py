"""One writer per run directory: an exclusive lock on ``<output_dir>/fap.lock``.

Two runs in one directory would interleave checkpoints, prune each other's and append to one
log: a scheduler that requeues a job whose first attempt still runs, or a command started
twice. So a run takes the directory before it reads or writes anything there
(`hold_run_dir`, called by ``fap.engine.setup.build_run`` right after the processes meet):

* the main process (global rank 0) opens ``fap.lock`` and takes an exclusive ``flock`` on it,
  without waiting; the other processes wait for the outcome (a broadcast), so a multi-process
  or multi-node launch holds one lock, and every process stops with the same error;
* the lock file records who holds it (host, pid, start time, command); a second run finds the
  lock taken and stops at once with `RunDirInUse` (a `ConfigError`: one line naming the other
  process, exit status 2);
* the holder empties the record when it releases the lock (`RunDirLock.release`; the run's end,
  or any exception). The kernel drops a ``flock`` when its process dies, so a lock whose
  holder was killed is free; its record is still there, and the next run takes the lock
  over with a warning naming the run that did not release it. The file itself is never
  deleted (a process could otherwise lock an unlinked file while another creates a new one).

What the lock assumes of the filesystem: that ``flock`` excludes across the machines that see
it. Local disks do; so does NFS (Linux emulates ``flock`` with NFS byte-range locks, NFSv4 or
NFSv3 with ``lockd``; a crashed client's lock lasts until its lease ends, about 90 s), GPFS,
and Lustre or BeeGFS with global locks (Lustre ``-o flock``; not ``-o localflock``, whose
locks hold on one node only and would let a run on another node in). Where ``flock`` is
refused (Lustre ``-o noflock``, some FUSE filesystems), fap falls back to the record alone:
a record of a live process on this host, or of any other host, is in use (its pid cannot be
checked from here: delete ``fap.lock`` if that run is gone); a record of a dead process on
this host is taken over with a warning. That fallback cannot exclude two runs starting in
the same instant.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from fap.checks import ConfigError

__all__ = ["LOCK_FILE", "RunDirInUse", "RunDirLock", "hold_run_dir"]

LOCK_FILE = "fap.lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunDirInUse(ConfigError):
    """Another run holds the run directory; the message names it and what to do."""


def _describe(record: Dict[str, Any]) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = f": {record['command']}" if record.get("command") else ""
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {when}{command}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirLock:
    """The exclusive lock of one run directory (see the module docstring).

    Args:
        run_dir: the run's output directory (created if missing).
    """

    def __init__(self, run_dir: os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Optional[str]:
        """Take the lock now or raise; return a warning when a dead run's lock was taken over.

        Raises:
            RunDirInUse: another live run holds it (named in the message).
            ConfigError: the directory or its lock file cannot be created, read or written.
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"log.output_dir={str(self.run_dir)!r}: cannot create its lock file {LOCK_FILE} "
                              f"({e.strerror or e}); choose a writable directory") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(self._read(fd)) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                self._check_record_only(self._read(fd))
            previous = self._read(fd)  # read once the lock is ours: a record left by a run that did not release it
            self._write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                             "command": " ".join(sys.argv)[:500]})
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"log.output_dir={str(self.run_dir)!r}: cannot lock it through {self.path} "
                              f"({e.strerror or e}); choose another directory") from e
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if previous:
            return (f"{self.run_dir}: taking over the lock of a run that ended without releasing it (killed?): "
                    f"{_describe(previous)}")
        return None

    def release(self) -> None:
        """Empty the record and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except OSError:
            pass  # the directory vanished or went read-only: the kernel still drops the lock below
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def _in_use(self, record: Dict[str, Any]) -> RunDirInUse:
        who = _describe(record) if record else "a process that has not written its record yet"
        return RunDirInUse(f"{self.run_dir} is in use by another fap run ({who}); wait for it to end or stop it, "
                           f"or choose another --log.output_dir")

    def _check_record_only(self, record: Dict[str, Any]) -> None:
        """No flock on this filesystem: judge the record (see the module docstring)."""
        if not record:
            return
        if record.get("host") != socket.gethostname():
            raise RunDirInUse(f"{self.run_dir} is in use by another fap run ({_describe(record)}), as far as "
                              f"{self.path} says: this filesystem has no file locks, and that host's processes "
                              f"cannot be checked from here. If that run is gone, delete {self.path}")
        if _pid_alive(record.get("pid")):
            raise self._in_use(record)

    @staticmethod
    def _read(fd: int) -> Dict[str, Any]:
        data = os.pread(fd, 1 << 16, 0)  # through this descriptor: another open+close would drop a POSIX lock
        try:
            record = json.loads(data.decode()) if data.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = {"command": f"unreadable lock record {data[:80]!r}"}
        return record if isinstance(record, dict) else {}

    @staticmethod
    def _write(fd: int, record: Dict[str, Any]) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)


def hold_run_dir(accelerator, run_dir: os.PathLike) -> Optional[RunDirLock]:
    """Lock ``run_dir`` for this run: the main process takes it, every process learns the outcome.

    Returns:
        The held lock on the main process, None on the others.

    Raises:
        RunDirInUse: on every process, when another run holds the directory.
        ConfigError: on every process, when the directory cannot be created or locked.
    """
    lock = RunDirLock(run_dir) if accelerator.is_main_process else None
    outcome: list = [None, None, None]  # [error class name, error message, warning]
    if lock is not None:
        try:
            outcome[2] = lock.acquire()
        except ConfigError as e:
            outcome[:2] = [type(e).__name__, str(e)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise (RunDirInUse if outcome[0] == RunDirInUse.__name__ else ConfigError)(outcome[1])
    if outcome[2] is not None and lock is not None:
        warnings.warn(outcome[2], stacklevel=2)
    return lock
