"""A disk that fills up, and the per-rank function the 2-rank checkpoint test spawns."""
from __future__ import annotations

import builtins
import errno
import hashlib
import time
from pathlib import Path

import torch


class FullDisk:
    """A file whose writes fail with ENOSPC once ``limit`` bytes are written (the rest of a write is lost)."""

    def __init__(self, f, limit: int):
        self._f, self._left = f, limit

    def write(self, data):
        size = len(data)
        if size > self._left:
            self._f.write(data[:self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk_open(limit: int, names):
    """An ``open`` for the store module: files whose name starts with one of ``names`` hit a full disk."""
    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(tuple(names)):
            return FullDisk(f, limit)
        return f
    return fake_open


def rank_files(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {f"model-dp{rank}.pt": {"w": torch.randn(64, 32, generator=g), "rank": rank},
            f"optim-dp{rank}.pt": {"m": torch.randn(300, generator=g)}}


def two_rank_scenarios(root: str) -> dict:
    """Rank function (real process, gloo): a good save, rank 1 failing with and without a marker, async."""
    import torch.distributed as dist
    from nl_pretrain.checkpoint import store as store_mod
    from nl_pretrain.checkpoint.store import CheckpointError, CheckpointStore, TorchDistComm

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchDistComm()
    out = {"rank": rank}

    store = CheckpointStore(root, keep_last=0, rank=rank, world=world, comm=comm, timeout_s=30)
    store.save(1, rank_files(rank, 1), meta={"from_rank": rank})
    latest = store.latest()
    index = store.index(latest)
    out["good"] = {"latest": latest.name, "index": index,
                   "sha_on_disk": {n: hashlib.sha256((latest / n).read_bytes()).hexdigest() for n in index["files"]},
                   "other_rank_w": store.read(latest, f"model-dp{1 - rank}.pt")["w"]}

    def failing_save(step, store, names):
        if rank == 1:
            store_mod.open = full_disk_open(100, names)
        t0 = time.monotonic()
        try:
            store.save(step, rank_files(rank, step))
            return {"error": None}
        except CheckpointError as e:
            return {"error": str(e), "seconds": time.monotonic() - t0}
        finally:
            if rank == 1:
                del store_mod.open

    # rank 1's disk is full for its optimizer file: it leaves rank-00001.failed, rank 0 stops waiting at once
    out["marked"] = failing_save(2, store, ["optim-"])
    # rank 1 cannot even write its marker (the whole disk is full): rank 0 gives up after timeout_s
    short = CheckpointStore(root, keep_last=0, rank=rank, world=world, comm=comm, timeout_s=2)
    out["silent"] = failing_save(3, short, ["optim-", "model-", "rank-"])
    try:                                                # both ranks name a file the same: rank 0 sees it
        store.save(6, {"same.pt": torch.tensor([rank])})
        out["duplicate"] = None
    except CheckpointError as e:
        out["duplicate"] = str(e)
    dist.barrier()
    out["after_failures"] = {"latest": store.latest().name, "dirs": sorted(p.name for p in Path(root).iterdir())}
    dist.barrier()                                      # both ranks looked before the next save starts

    background = CheckpointStore(root, keep_last=0, rank=rank, world=world, comm=comm, async_save=True, timeout_s=30)
    files = rank_files(rank, 4)
    expected = files[f"model-dp{rank}.pt"]["w"].clone()
    background.save(4, files)
    files[f"model-dp{rank}.pt"]["w"].zero_()            # training goes on right after save() returns
    background.wait()
    dist.barrier()                                      # rank 0's wait() returned: the commit is done
    latest = background.latest()
    out["async"] = {"latest": latest.name, "index": background.index(latest),
                    "w_equal": torch.equal(background.read(latest, f"model-dp{rank}.pt")["w"], expected)}
    return out
