"""The run directory: one training run at a time, and files that appear whole.

Two ``nl-pretrain train`` processes with the same ``train.run_dir`` (a job launched twice, a second
launch while the first is still running) would append to the same metrics and write checkpoints over
each other. :class:`RunDirLock` makes the second one fail before it does any work, naming the run
that holds the directory. The lock is an ``flock`` on ``<dir>/.lock``: the kernel drops it when the
holder exits, however it exits (SIGKILL, OOM), so there are no stale locks to clean up. A restarted
worker group (Ray) waits up to ``wait_s`` (default 15 s, or ``NL_PRETRAIN_LOCK_WAIT_S``) for the
old one's processes to be gone. On NFS Linux maps
``flock`` to POSIX locks, which the server arbitrates across nodes.
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
            wait_s = float(os.environ.get("NL_PRETRAIN_LOCK_WAIT_S", "15"))
        self.files: List = []
        unique = []
        for d in dirs:
            d = Path(d).resolve()
            if d not in unique:
                unique.append(d)
        try:
            for d in unique:
                self.files.append(self._take(d, wait_s, poll_s))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _take(directory: Path, wait_s: float, poll_s: float):
        directory.mkdir(parents=True, exist_ok=True)
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

    def release(self) -> None:
        for f in self.files:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            finally:
                f.close()
        self.files = []

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
