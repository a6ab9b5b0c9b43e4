"""One training run at a time in a run folder: RUN/run.lock names the process that writes there.

The lock is a small JSON file (pid, host, start time, command) made whole with one atomic `os.link`, so a second
run sees either no lock or a complete one. A lock whose process is gone (a run killed outright) is stale: the next
run on the same host takes it over and says so. A lock from another host cannot be checked and is only ever
removed by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..messages import warn

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = f", command: {info['command']}" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}{command}"


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: no process to check
    return info if isinstance(info, dict) else {}


class RunLock:
    """Holds RUN/run.lock from `acquire()` to `release()`. A live holder on this host, or any holder on another, is
    a ConfigError naming it; a stale one (its process gone) is taken over with a warning."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / LOCK_FILE
        self.made_folder = False
        self.held = False

    def acquire(self) -> None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.made_folder = True
        host = socket.gethostname()
        info = {"pid": os.getpid(), "host": host, "started": time.time(), "command": " ".join(sys.argv)}
        tmp = self.folder / f".{LOCK_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = _read(self.path)
                if holder is None:  # released meanwhile: try again
                    continue
                pid = holder.get("pid")
                stale = holder.get("host") == host and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid))
                if not stale:
                    elsewhere = "" if holder.get("host") == host else (
                        "; it runs on another host, whose processes cannot be checked from here: if it is no longer "
                        f"running, delete {self.path}")
                    raise ConfigError(f"--output {self.folder} is in use by another training run ({_holder(holder)})"
                                      f"{elsewhere}: wait for it to finish, or choose another --output folder")
                warn(f"{self.folder}: taking over the lock of a run that is no longer running ({_holder(holder)})")
                self.path.unlink(missing_ok=True)
            raise ConfigError(f"--output {self.folder}: could not take the lock {self.path} (other runs are starting "
                              "there at the same time)")
        finally:
            tmp.unlink(missing_ok=True)
            if not self.held:
                self._remove_made_folder()

    def release(self) -> None:
        """Remove the lock (if still ours), and the folder if `acquire` made it and nothing else was written."""
        if self.held:
            if (_read(self.path) or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
        self._remove_made_folder()

    def _remove_made_folder(self) -> None:
        if self.made_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
