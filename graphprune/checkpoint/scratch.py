"""The folder an offloaded run keeps its activation files in, and the folders killed runs
left behind.

A run's folder is ``graphprune-activations-<host>-<pid>-<random>`` in ``offload_dir``, and
the run holds an exclusive ``flock`` on its ``.lock`` file while it lives. The run removes the
folder as it ends (also on an error or Ctrl-C); one killed outright (SIGKILL, the kernel's
out-of-memory killer) cannot, so each run first removes the folders a dead run left: named
after this host, their process not running here, and their lock free (the kernel releases a
killed process's locks). All three must hold: another machine or container with the same
host name has its own process numbers, but its live run holds its lock; on a file system
that cannot lock, runs go on unlocked and keep each other's folders (only one killed before
it made its lock file is removed there). Nothing is removed where processes cannot be asked about
safely (Windows, where ``os.kill`` ends a process; no ``fcntl``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # (Windows)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK = ".lock"


@contextlib.contextmanager
def activation_folder(offload_dir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """A new folder in ``offload_dir`` (the temporary directory when None), locked while the
    ``with`` block runs and removed after it; the folders of dead runs are removed first,
    each logged."""
    prefix = f"graphprune-activations-{socket.gethostname()}-"
    parent = Path(offload_dir if offload_dir is not None else tempfile.gettempdir())
    if parent.is_dir():
        _remove_left_by_dead_runs(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        with open(folder / LOCK, "w") as lock:
            if fcntl is not None:
                with contextlib.suppress(OSError):  # no locks here: nothing is swept either
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_left_by_dead_runs(parent: Path, prefix: str) -> None:
    for old in sorted(parent.iterdir()):  # (not glob: a host name may hold "[" or "*")
        if not old.name.startswith(prefix) or old.is_symlink() or not old.is_dir():
            continue
        # <pid>-<random>: mkdtemp's random part has no "-", so host "a"'s prefix does not
        # take host "a-1"'s folders (graphprune-activations-a-1-<pid>-<random>) for its own
        pid, _, rest = old.name[len(prefix) :].partition("-")
        if not (pid.isascii() and pid.isdecimal() and rest and "-" not in rest):
            continue
        if _alive(int(pid)) or not _lock_is_free(old / LOCK):
            continue
        shutil.rmtree(old, ignore_errors=True)
        if not old.exists():
            logger.warning("removed %s: activations of a run killed before it could remove "
                           "them (process %s of this host has ended)", old, pid)  # fmt: skip


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs; True where that cannot be asked safely."""
    if os.name != "posix" or fcntl is None:
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; not a process number
        return True
    return True


def _lock_is_free(path: Path) -> bool:
    """Whether no process holds ``path``'s lock (a folder killed before its lock file was
    made has none: free); False where the file system cannot tell."""
    if fcntl is None:
        return False
    try:
        with open(path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as the file closes
    except FileNotFoundError:
        return True
    except OSError:  # held (BlockingIOError), or no locks on this file system
        return False
    return True
