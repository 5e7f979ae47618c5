"""Sharded checkpoints on disk: every rank writes its own files, rank 0 commits the directory.

The store does not know what the files hold (model shards, optimizer state, data-loader state);
it makes a set of per-rank files appear on disk all at once or not at all::

    root/
      step-00000123/               a complete checkpoint
        <name> ...                 the files each rank passed to save(), written by that rank
        rank-00000.json ...        per-rank manifest: file names, byte sizes, sha256
        index.json                 written last, by rank 0: format, step, world, meta, every file
      step-00000130.tmp-1a2b3c4d/  a save in progress, or one that crashed: never read
      latest                       text: the name of the newest committed directory

Order of a save: files -> rank manifests -> index.json -> rename of the temporary directory ->
``latest``. Protocol, retention and failure modes: docs/CHECKPOINT.md ("The store").
"""
from __future__ import annotations

import copy
import datetime
import errno
import hashlib
import json
import operator
import os
import re
import secrets
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

FORMAT = "nl-pretrain-sharded-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_DIR = re.compile(r"^step-\d+\.tmp-")        # also `<temp>.replaced`: an old copy being removed
_RESERVED = re.compile(r"^(index\.json|latest|rank-\d+\.(json|failed))$|\.part$")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step or directory, the file,
    the cause and what to do."""


class CheckpointWarning(UserWarning):
    """latest() skipped an incomplete or corrupt checkpoint directory."""


class LocalComm:
    """The communicator of a single process: barrier and broadcast do nothing."""

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj


class TorchDistComm:
    """barrier / broadcast over ``torch.distributed`` (the default group, or ``group``).

    ``src`` is a rank within ``group``, the same numbering as the store's ``rank``.
    """

    def __init__(self, group=None):
        self.group = group

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        import torch.distributed as dist
        if self.group is not None:
            src = dist.get_global_rank(self.group, src)
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


@dataclass
class _Job:
    """One rank's part of one save."""
    step: int
    tmp: Path                  # root/step-XXXXXXXX.tmp-<nonce>, chosen by rank 0
    files: Mapping
    problem: Optional[str]     # this rank's request was invalid: it reports the error instead of writing
    meta: Optional[dict]       # rank 0 only
    started: float             # mtime of the new temp dir (the filesystem's clock): older temp dirs are stale


class CheckpointStore:
    """Sharded checkpoints under ``root``; every rank of a job holds one and calls save() together.

    Args:
        root: directory of the checkpoints; a filesystem all ranks see (checked at the first save).
        keep_last: after a save, keep the newest ``keep_last`` complete checkpoints (0: keep all).
        keep_every: also keep every checkpoint whose step is a multiple of it (0: none).
        rank, world: this process's rank and the number of ranks that save together.
        comm: ``barrier()`` / ``broadcast_object(obj, src)``; ``TorchDistComm()`` in a torch.distributed
            job. Default: ``LocalComm()``, allowed only when ``world == 1``.
        async_save: save() copies the tensors to host memory and returns; one background thread writes.
        timeout_s: how long rank 0 waits for the other ranks' manifests before failing the save.
        verify_on_latest: "size" (latest() checks that every file exists with its size) or "full"
            (also its sha256: reads every byte of the checkpoint).
    """

    def __init__(self, root, keep_last: int = 3, keep_every: int = 0, rank: int = 0, world: int = 1,
                 comm=None, async_save: bool = False, timeout_s: float = 600.0,
                 verify_on_latest: str = "size"):
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{name} must be an int >= 0, got {value!r}")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise CheckpointError(f"rank ({rank!r}) must be in [0, world) with world ({world!r}) >= 1")
        if comm is None and world > 1:
            raise CheckpointError(f"world is {world} but no comm was given: pass comm=TorchDistComm()")
        if not timeout_s > 0:
            raise CheckpointError(f"timeout_s must be > 0, got {timeout_s!r}")
        if verify_on_latest not in ("size", "full"):
            raise CheckpointError(f"verify_on_latest must be 'size' or 'full', got {verify_on_latest!r}")
        self.root = Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank, self.world = rank, world
        self.comm = comm if comm is not None else LocalComm()
        self.async_save = async_save
        self.timeout_s = float(timeout_s)
        self.verify_on_latest = verify_on_latest
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    # ----------------------------------------------------------------------------------- saving

    def save(self, step: int, files: Mapping[str, Any], meta: Optional[dict] = None,
             private: Iterable[str] = ()) -> None:
        """Write this rank's ``files`` ({plain file name: object for torch.save}) as checkpoint ``step``.

        Collective: every rank calls it with the same step. ``meta`` (a dict of JSON values) is taken
        from rank 0 only. Synchronous: returns when the checkpoint is committed on every rank, or
        raises CheckpointError on every rank. Asynchronous: returns after the tensors are copied to
        host memory; errors are raised by the next save() or wait(). Saving a step that already
        exists replaces it once the new copy is complete. ``private``: names of files whose tensors
        are already CPU copies that nobody changes afterwards; an asynchronous save writes them
        without copying them again.
        """
        previous = self._join()
        if not isinstance(step, bool) and hasattr(step, "__index__"):
            step = operator.index(step)            # numpy integers
        try:
            problem = _request_problem(step, files)
        except Exception as e:         # e.g. a name that cannot be encoded
            problem = f"checkpoint step {step}: invalid files argument: {e!r}"
        plan, meta_copy = {"error": None}, None
        if self.rank == 0:             # an exception here would leave the other ranks in the broadcast
            try:
                plan, meta_copy = self._plan(step, meta, problem, previous)
            except Exception as e:
                plan = {"error": f"checkpoint step {step}: could not start the save: {e!r}"}
        plan = self.comm.broadcast_object(plan, src=0)
        if previous is not None:
            raise previous
        if plan["error"]:
            raise CheckpointError(plan["error"] if self.rank == 0 else f"{plan['error']} (reported by rank 0)")
        job = _Job(step, self.root / plan["tmp"], files, problem, meta_copy, plan["started"])
        if not self.async_save:
            error = self._attempt(job)
            verdict = self.comm.broadcast_object(str(error) if error and self.rank == 0 else None, src=0)
            if error is not None:
                raise error
            if verdict:
                raise CheckpointError(f"{verdict} (reported by rank 0)")
            return
        if problem:                    # tell rank 0 now, so that it does not wait for this rank
            self._mark_failed(job, problem)
            raise CheckpointError(problem)
        try:
            private = set(private)
            job.files = {n: obj if n in private else snapshot_to_host(obj) for n, obj in files.items()}
        except Exception as e:
            message = (f"checkpoint step {step}: copying the tensors to host memory failed on rank "
                       f"{self.rank}: {e!r}")
            self._mark_failed(job, message)
            if self.rank == 0:
                shutil.rmtree(job.tmp, ignore_errors=True)
            raise CheckpointError(message) from e
        self._thread = threading.Thread(target=self._background, args=(job,), daemon=False,
                                        name=f"checkpoint-save-{step}")
        self._thread.start()

    def wait(self) -> None:
        """Block until this rank's async save in flight (if any) has finished; raise its error.

        On rank 0 a finished save is committed (renamed, ``latest`` moved). Ranks > 0 know only that
        their own files are written; a failure of the commit reaches them at their next save().
        """
        error = self._join()
        if error is not None:
            raise error

    def _join(self) -> Optional[CheckpointError]:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def _background(self, job: _Job) -> None:
        self._error = self._attempt(job)

    def _plan(self, step, meta, problem, previous) -> Tuple[dict, Optional[dict]]:
        """Rank 0: check the request and create the temp dir. Returns (what every rank needs, meta)."""
        if previous is not None:
            return {"error": f"checkpoint step {step} was not attempted: the previous save failed on "
                             f"rank 0: {previous}"}, None
        if problem:
            return {"error": problem}, None
        meta = {} if meta is None else meta
        bad = _json_problem(meta, "meta") if isinstance(meta, dict) else \
            f"meta must be a dict of JSON values, got {type(meta).__name__}"
        if bad:
            return {"error": f"checkpoint step {step}: {bad}"}, None
        tmp = self.root / f"step-{step:08d}.tmp-{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            started = tmp.stat().st_mtime
        except OSError as e:
            return {"error": f"checkpoint step {step}: cannot create {tmp} ({e}); the checkpoint root "
                             f"{self.root} must be a writable directory: fix it or choose another root"}, None
        return {"error": None, "tmp": tmp.name, "started": started}, json.loads(json.dumps(meta))

    def _attempt(self, job: _Job) -> Optional[CheckpointError]:
        """This rank's files, then (rank 0) the commit; the error instead of raising it."""
        try:
            if job.problem:
                raise CheckpointError(job.problem)
            self._write_rank_files(job)
            if self.rank == 0:
                self._commit(job)
            return None
        except BaseException as e:     # noqa: BLE001 - a background thread must not lose its error
            error = e
            if not isinstance(e, CheckpointError):
                error = CheckpointError(f"checkpoint step {job.step}: unexpected failure on rank {self.rank}: {e!r}")
                error.__cause__ = e
            if self.rank == 0:
                shutil.rmtree(job.tmp, ignore_errors=True)
            else:
                self._mark_failed(job, str(error))
            return error

    def _write_rank_files(self, job: _Job) -> None:
        if not job.tmp.is_dir():
            raise CheckpointError(
                f"checkpoint step {job.step}: rank {self.rank} cannot see {job.tmp}, which rank 0 "
                f"created (or rank 0 already gave up on this save); the root must be one filesystem "
                f"shared by all ranks")
        entries = []
        for name, obj in job.files.items():
            try:
                nbytes, sha = _write_file(job.tmp / name, obj, self.rank)
            except OSError as e:
                raise CheckpointError(self._write_failure(job, name, e)) from e
            except Exception as e:
                raise CheckpointError(f"checkpoint step {job.step}: could not serialise {name!r} on rank "
                                      f"{self.rank} with torch.save: {e!r}") from e
            entries.append({"name": name, "bytes": nbytes, "sha256": sha})
            _maybe_kill_in_save(job.step, self.rank, self.root)
        manifest = f"rank-{self.rank:05d}.json"
        try:
            _fsync_dir(job.tmp)
            _write_text(job.tmp / manifest, json.dumps({"rank": self.rank, "step": job.step,
                                                        "files": entries}, indent=1))
        except OSError as e:
            raise CheckpointError(self._write_failure(job, manifest, e)) from e

    def _write_failure(self, job: _Job, name: str, e: OSError) -> str:
        msg = f"checkpoint step {job.step}: could not write {name!r} (rank {self.rank}) to {job.tmp}: {e}."
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f" ({shutil.disk_usage(self.root).free / 2**30:.2f} GiB free now)"
            except OSError:
                free = ""
            msg += (f" The disk holding {self.root} is full or over quota{free}: free space, lower "
                    f"keep_last, or point the checkpoint root at a larger filesystem.")
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            msg += f" {self.root} is not writable: fix its permissions or choose another root."
        elif not job.tmp.is_dir():
            msg += " The temporary directory is gone: rank 0 gave up on this save (see its error)."
        return msg + " The previous checkpoint and 'latest' are untouched."

    def _mark_failed(self, job: _Job, message: str) -> None:
        """Best effort: ``rank-XXXXX.failed`` tells rank 0 to stop waiting for this rank."""
        try:
            _write_text(job.tmp / f"rank-{self.rank:05d}.failed", message)
        except OSError:
            pass                       # rank 0 then times out, naming this rank

    def _commit(self, job: _Job) -> None:
        """Rank 0: wait for every manifest, write index.json, rename the directory, move ``latest``."""
        manifests = self._await_manifests(job)
        files: Dict[str, dict] = {}
        for rank, manifest in enumerate(manifests):
            for entry in manifest["files"]:
                name = entry["name"]
                if name in files:
                    raise CheckpointError(f"checkpoint step {job.step}: file {name!r} is written by ranks "
                                          f"{files[name]['rank']} and {rank}; names must be unique across ranks "
                                          f"(put the rank coordinates in the name)")
                try:
                    size = (job.tmp / name).stat().st_size
                except OSError as e:
                    raise CheckpointError(f"checkpoint step {job.step}: {name!r} of rank {rank} is listed in "
                                          f"its manifest but cannot be found: {e}") from e
                if size != entry["bytes"]:
                    raise CheckpointError(f"checkpoint step {job.step}: {name!r} of rank {rank} has {size} "
                                          f"bytes on disk, its manifest says {entry['bytes']}")
                files[name] = {"rank": rank, "bytes": entry["bytes"], "sha256": entry["sha256"]}
        now = time.time()
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": job.step, "world": self.world,
                 "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
                 "created_unix": now, "meta": job.meta, "files": files}
        final = self.root / f"step-{job.step:08d}"
        aside = job.tmp.with_name(job.tmp.name + ".replaced")
        stage = "index.json"
        try:
            _write_text(job.tmp / "index.json", json.dumps(index, indent=1))
            _fsync_dir(job.tmp)
            stage = f"{final.name} (renaming {job.tmp.name})"
            if final.exists():         # replace an older copy of this step only now that the new one is complete
                os.rename(final, aside)
            try:
                os.rename(job.tmp, final)
            except OSError:
                if aside.exists():
                    os.rename(aside, final)
                raise
            _fsync_dir(self.root)
            stage = "latest"           # a failure from here on leaves a complete but uncommitted directory
            _write_text(self.root / "latest", final.name + "\n")
            _fsync_dir(self.root)
        except OSError as e:
            raise CheckpointError(self._write_failure(job, stage, e)) from e
        shutil.rmtree(aside, ignore_errors=True)
        try:
            self._retain(job.step, job.started)
        except OSError as e:           # the checkpoint is committed: retention failing is not a failed save
            _warn(f"retention after checkpoint step {job.step} failed: {e}")

    def _await_manifests(self, job: _Job) -> List[dict]:
        """Poll the temp dir (no collectives: this also runs in the background thread)."""
        expected = {f"rank-{r:05d}.json": r for r in range(self.world)}
        deadline, pause = time.monotonic() + self.timeout_s, 0.01
        while True:
            names = set(os.listdir(job.tmp))
            failed = sorted(n for n in names if n.endswith(".failed"))
            if failed:
                rank = int(failed[0][len("rank-"):-len(".failed")])
                text = (job.tmp / failed[0]).read_text(errors="replace").strip()
                raise CheckpointError(f"checkpoint step {job.step} failed on rank {rank}: {text}")
            missing = [r for n, r in expected.items() if n not in names]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"checkpoint step {job.step}: rank(s) {_ranks(missing)} wrote no manifest in {job.tmp} "
                    f"within timeout_s={self.timeout_s:g} s; they crashed, hang, or do not see this directory "
                    f"(the root must be shared by all ranks). If their files are only slow to write, raise "
                    f"timeout_s.")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)
        return [json.loads((job.tmp / n).read_text()) for n in expected]

    def _retain(self, step: int, started: float) -> None:
        """Rank 0, after a commit: delete old checkpoints and the temp dirs of crashed saves."""
        doomed = []
        if self.keep_last:
            complete = [s for s, _ in self.list()]
            newest = set(complete[-self.keep_last:])
            doomed = [self.root / f"step-{s:08d}" for s in complete
                      if s != step and s not in newest and not (self.keep_every and s % self.keep_every == 0)]
        for child in self.root.iterdir():
            try:
                if _TEMP_DIR.match(child.name) and child.is_dir() and child.stat().st_mtime < started:
                    doomed.append(child)
            except OSError:
                pass
        for path in doomed:
            try:
                shutil.rmtree(path)
            except OSError as e:
                _warn(f"retention could not delete {path}: {e}; delete it by hand")

    # ----------------------------------------------------------------------------------- reading

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint directory, or None. Read-only, no collectives.

        Follows ``root/latest``; if what it names is incomplete or corrupt, warns (naming the
        directory and the problem) and falls back to the newest complete checkpoint older than it.
        Never returns a temporary directory.
        """
        full = self.verify_on_latest == "full"
        older_than = None
        pointer = self.root / "latest"
        try:
            named = pointer.read_text().strip()
        except FileNotFoundError:
            named = None
        except OSError as e:
            named = None
            _warn(f"cannot read {pointer} ({e}); scanning {self.root} for checkpoints")
        if named is not None:
            match = _STEP_DIR.match(named)
            if match is None:
                _warn(f"{pointer} holds {named[:80]!r}, not a checkpoint name; scanning {self.root}")
            else:
                problem = self.problem(self.root / named, full)
                if problem is None:
                    return self.root / named
                _warn(f"checkpoint {self.root / named} (named by {pointer}) is unusable: {problem}; "
                      f"falling back to the next older complete checkpoint")
                older_than = int(match.group(1))
        for step, path in reversed(self._step_dirs()):
            if older_than is not None and step >= older_than:
                continue
            problem = self.problem(path, full)
            if problem is None:
                return path
            _warn(f"skipping checkpoint {path}: {problem}")
        return None

    def list(self) -> List[Tuple[int, Path]]:
        """``[(step, path)]`` of the complete checkpoints (index.json and every file with its size),
        oldest first."""
        return [(s, p) for s, p in self._step_dirs() if self.problem(p) is None]

    def index(self, path) -> dict:
        """The parsed ``index.json`` of a checkpoint directory (format, step, world, meta, files)."""
        path = Path(path)
        try:
            index = json.loads((path / "index.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} has no index.json: not a complete checkpoint (its save did not "
                                  f"finish, or it is not a checkpoint directory)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / 'index.json'} is unreadable: {e}") from e
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CheckpointError(f"{path / 'index.json'} is not a {FORMAT} index")
        if index.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} has format_version {index.get('format_version')}; this code reads "
                                  f"up to {FORMAT_VERSION}: update nl_pretrain to load it")
        return index

    def read(self, path, name: str, verify: bool = True) -> Any:
        """``torch.load`` one file of a checkpoint to CPU (memory-mapped when possible).

        With ``verify``, the file's size and sha256 are compared with index.json first; a mismatch
        raises CheckpointError naming the file.
        """
        path = Path(path)
        files = self.index(path)["files"]
        if name not in files:
            shown = ", ".join(sorted(files)[:8]) + (", ..." if len(files) > 8 else "")
            raise CheckpointError(f"{path} has no file {name!r}; it has {len(files)}: {shown}")
        if verify:
            problem = _file_problem(path, name, files[name], full=True)
            if problem:
                raise CheckpointError(f"checkpoint {path}: {problem}; load an older checkpoint (store.list())")
        try:
            try:
                return torch.load(path / name, map_location="cpu", weights_only=False, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):   # a legacy (non-zip) torch.save file: load it into memory
                    raise
                return torch.load(path / name, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: cannot load {name!r}: {e!r}") from e

    def problem(self, path, full: bool = False) -> Optional[str]:
        """What is wrong with a checkpoint directory (None if complete): index.json, then every file's
        presence and size, and with ``full`` its sha256."""
        try:
            index = self.index(path)
        except CheckpointError as e:
            return str(e)
        for name, entry in index["files"].items():
            problem = _file_problem(Path(path), name, entry, full)
            if problem:
                return problem
        return None

    def _step_dirs(self) -> List[Tuple[int, Path]]:
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), c) for c in children if (m := _STEP_DIR.match(c.name)) and c.is_dir()]
        return sorted(found)


# --------------------------------------------------------------------------------------- helpers

def snapshot_to_host(obj: Any, _memo: Optional[dict] = None) -> Any:
    """A copy of ``obj`` in which every torch.Tensor inside nested dict / list / tuple is a new CPU copy.

    Tensors that share storage (views, tied weights) share one copy, so torch.save writes what it
    would have written from the originals. Other objects are not copied: they are pickled later, in
    the background, and must not be modified meanwhile.
    """
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        return _copy_tensor(obj, memo)
    if isinstance(obj, dict):
        out = copy.copy(obj)           # keeps the type and attributes (state_dict's _metadata)
        for key, value in obj.items():
            out[key] = snapshot_to_host(value, memo)
        return out
    if isinstance(obj, list):
        items = [snapshot_to_host(v, memo) for v in obj]
        if type(obj) is list:
            return items
        out = copy.copy(obj)
        out[:] = items
        return out
    if isinstance(obj, tuple):
        items = [snapshot_to_host(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    t = t.detach()
    if (type(t) is not torch.Tensor or t.layout is not torch.strided or t.is_quantized or t.is_conj()
            or t.is_neg() or t.device.type not in ("cpu", "cuda")):
        return t.to("cpu", copy=True)
    storage = t.untyped_storage()
    key = (str(storage.device), storage.data_ptr(), storage.nbytes())
    host = memo.get(key)
    if host is None:
        host = storage.clone() if storage.device.type == "cpu" else storage.cpu()
        memo[key] = host
    return torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())


class _HashingWriter:
    """The file object torch.save writes to: every byte feeds sha256 on its way to disk.

    torch.save turns an exception raised here into an opaque RuntimeError, so the first OSError is
    kept in ``error`` for the caller to re-raise.
    """

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        if self.error is not None:
            raise self.error
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self._f.flush()


def _write_file(path: Path, obj: Any, rank: int) -> Tuple[int, str]:
    """torch.save to ``<path>.<rank>.part``, fsync, rename; returns (bytes, sha256).

    The rank in the temporary name keeps two ranks that (wrongly) pass the same name from clobbering
    each other's half-written file: rank 0 then reports the duplicate from the manifests.
    """
    part = path.with_name(f"{path.name}.{rank:05d}.part")
    writer = None
    try:
        with open(part, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        if os.stat(part).st_size != writer.bytes:
            raise OSError(errno.EIO, f"{part} has {os.stat(part).st_size} bytes, {writer.bytes} were written")
        os.replace(part, path)
    except BaseException as e:
        _remove(part)
        if writer is not None and writer.error is not None and writer.error is not e:
            raise writer.error from e
        raise
    return writer.bytes, writer.sha256.hexdigest()


def _maybe_kill_in_save(step: int, rank: int, root: Path) -> None:
    """Fault injection (tests): ``NL_PRETRAIN_FAULT_KILL_SAVE=<rank>:<step>`` SIGKILLs that rank once,
    after it wrote its first file of that step's save (a marker file in the checkpoint root makes it
    happen once)."""
    spec = os.environ.get("NL_PRETRAIN_FAULT_KILL_SAVE", "")
    if not spec:
        return
    r, s = (int(x) for x in spec.split(":"))
    marker = root / ".fault-kill-save-done"
    if r == rank and s == step and not marker.exists():
        marker.write_text(f"rank {rank} killed while saving step {step}\n")
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _write_text(path: Path, text: str) -> None:
    """Write, fsync and atomically rename into place (the caller fsyncs the directory)."""
    part = path.with_name(f"{path.name}.part")
    try:
        with open(part, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        _remove(part)
        raise


def _fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _file_problem(root: Path, name: str, entry: dict, full: bool) -> Optional[str]:
    path = root / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"file {name!r} (rank {entry.get('rank')}) is missing"
    except OSError as e:
        return f"file {name!r} cannot be read: {e}"
    if size != entry["bytes"]:
        return f"file {name!r} has {size} bytes, index.json says {entry['bytes']}"
    if full:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
        if sha.hexdigest() != entry["sha256"]:
            return (f"file {name!r} is corrupt: sha256 {sha.hexdigest()[:16]}..., index.json says "
                    f"{entry['sha256'][:16]}...")
    return None


def _request_problem(step, files) -> Optional[str]:
    """What is wrong with this rank's arguments to save(), checked before anything is written."""
    if isinstance(step, bool) or not isinstance(step, int):
        return f"checkpoint step must be an int, got {step!r} ({type(step).__name__})"
    if step < 0:
        return f"checkpoint step must be >= 0, got {step}"
    if not isinstance(files, Mapping):
        return f"checkpoint step {step}: files must be a dict {{file name: object}}, got {type(files).__name__}"
    for name in files:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name or (os.altsep and os.altsep in name):
            return (f"checkpoint step {step}: file name {name!r} must be a plain, non-empty file name "
                    f"(no path separators): put the structure into the name, e.g. 'model-tp0-pp1.pt'")
        if _RESERVED.search(name):
            return (f"checkpoint step {step}: file name {name!r} is reserved by the checkpoint store "
                    f"(index.json, latest, rank-N.json/.failed, *.part): rename it")
        if len(name.encode()) > 250:
            return f"checkpoint step {step}: file name {name[:40]!r}... is longer than 250 bytes: shorten it"
    return None


def _json_problem(value: Any, where: str) -> Optional[str]:
    """The first value inside ``value`` that JSON cannot round-trip, named by its path."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has the key {key!r} ({type(key).__name__}); JSON keys must be str: convert it"
            problem = _json_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    return (f"{where} = {repr(value)[:80]} ({type(value).__qualname__}) is not JSON-serialisable: convert it "
            f"to str / int / float / bool / None / list / dict (e.g. str(x), x.item(), x.tolist())")


def _ranks(ranks: List[int]) -> str:
    return ", ".join(map(str, ranks[:16])) + (f", ... ({len(ranks)} in all)" if len(ranks) > 16 else "")


def _warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=3)
    print(f"warning: {message}", file=sys.stderr, flush=True)
