"""The run directory: one training run at a time, and files that appear whole.

Two ``nl-pretrain train`` processes with the same ``train.run_dir`` (a job launched twice, a second
launch while the first is still running) would append to the same metrics and write checkpoints over
each other. :class:`RunDirLock` makes the second one fail before it does any work, naming the run
that holds the directory, at once. The lock is an ``flock`` on ``<dir>/.lock``: the kernel drops it
when the holder exits, however it exits (SIGKILL, OOM), so there are no stale locks to clean up. A
restarted worker group (Ray) waits up to ``NL_PRETRAIN_LOCK_WAIT_S`` seconds (the Ray launcher sets
15) for the old one's processes to be gone; the default is 0. A run that fails before writing
anything removes the directories it created (:meth:`RunDirLock.release` with ``cleanup``), so a
failed start leaves no empty run directory. On NFS Linux maps ``flock`` to POSIX locks, which the
server arbitrates across nodes.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterable, List, Optional


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename: readers see the old file or
    the new one, never a part."""
    from data_pipeline.shards import atomic_write
    atomic_write(Path(path), text.encode())


class RunDirLock:
    """Exclusive use of ``dirs`` (created if missing) by this process until :meth:`release`."""

    def __init__(self, dirs: Iterable[Path], wait_s: Optional[float] = None, poll_s: float = 0.5):
        if wait_s is None:
            wait_s = float(os.environ.get("NL_PRETRAIN_LOCK_WAIT_S", "0"))
        self.files: List = []
        self.created: List[Path] = []        # directories this lock made (removed by a failed start)
        unique = []
        for d in dirs:
            d = Path(d).resolve()
            if d not in unique:
                unique.append(d)
        try:
            for d in unique:
                self.files.append(self._take(d, wait_s, poll_s))
        except BaseException:
            self.release(cleanup=True)
            raise

    def _take(self, directory: Path, wait_s: float, poll_s: float):
        missing = [p for p in [directory, *directory.parents] if not p.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        self.created.extend(missing)          # deepest first
        path = directory / ".lock"
        f = open(path, "a+")
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = _holder(path)
                if time.monotonic() >= deadline:
                    f.close()
                    raise RunDirBusy(
                        f"{directory} is in use by another training run ({holder or 'holder unknown'}). "
                        f"Wait for it to finish, stop it, or give this run another --train.run_dir "
                        f"(or --checkpoint.dir)") from None
                if not told:
                    print(f"waiting up to {wait_s:.0f} s for {directory} ({holder or 'holder unknown'}) "
                          f"to be released", flush=True)
                    told = True
                time.sleep(poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        return f

    def release(self, cleanup: bool = False) -> None:
        """Unlock. ``cleanup`` (a failed start): also remove the directories this lock created if
        they hold nothing but the lock file (and empty directories)."""
        for f in self.files:
            try:
                if cleanup:
                    _remove_if_only_lock(Path(f.name).parent, self.created)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            finally:
                f.close()
        self.files = []
        if cleanup:
            for d in self.created:
                try:
                    d.rmdir()                  # only if empty
                except OSError:
                    pass
        self.created = []

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.release(cleanup=exc_type is not None)


def _remove_if_only_lock(directory: Path, created: List[Path]) -> None:
    """Remove ``directory/.lock`` (and empty subdirectories) when ``directory`` was created by this
    process and holds nothing else, while the lock is still held."""
    if directory not in created:
        return
    try:
        children = list(directory.iterdir())
        if any(c.name != ".lock" and not (c.is_dir() and not any(c.iterdir())) for c in children):
            return
        for c in children:
            c.unlink() if c.name == ".lock" else c.rmdir()
    except OSError:
        pass


def _holder(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def run_dirs(cfg) -> List[Path]:
    """The directories a run writes: ``train.run_dir`` and ``checkpoint.dir`` when it is elsewhere."""
    dirs = [Path(cfg.train.run_dir)]
    if cfg.checkpoint.dir:
        dirs.append(Path(cfg.checkpoint.dir))
    return dirs
