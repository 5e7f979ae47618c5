"""Where the tasks of ``prepare_dataset`` run: in this process (``workers=0``) or on Ray."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from data_pipeline.packing import pack_shard, tokenize_group


class _Done:
    def __init__(self, value):
        self.value = value


class InlineExecutor:
    """Runs tasks in this process, at submission (workers=0)."""
    capacity = 1

    def tokenize(self, units, *args):
        return tuple(_Done(v) for v in tokenize_group(units, *args))

    def shard(self, args, pieces):
        return _Done(pack_shard(*args, *[p.value for p in pieces]))

    def put(self, value):
        return value

    def wait(self, handles):
        return list(handles)

    def get(self, handle):
        return handle.value


class RayExecutor:
    def __init__(self, workers: int, address: Optional[str]):
        import ray
        self.ray = ray
        self.owns = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=address or None, log_to_driver=False)
            else:
                # Workers of a local cluster inherit the environment the raylet starts with: make this
                # package importable there without a runtime_env (which costs ~2 s per worker start).
                saved = os.environ.get("PYTHONPATH")
                pkg_root = str(Path(__file__).resolve().parent.parent)
                os.environ["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([saved] if saved else []))
                try:
                    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                             _temp_dir=f"/tmp/nlray-{os.getuid()}")
                finally:
                    if saved is None:
                        del os.environ["PYTHONPATH"]
                    else:
                        os.environ["PYTHONPATH"] = saved
            self.owns = True
        self.capacity = workers
        self._tok = ray.remote(num_cpus=1)(tokenize_group).options(num_returns=3)
        self._shard = ray.remote(num_cpus=1)(pack_shard)

    def tokenize(self, units, *args):
        return tuple(self._tok.remote(units, *args))

    def shard(self, args, pieces):
        return self._shard.remote(*args, *pieces)

    def put(self, value):
        return self.ray.put(value)

    def wait(self, handles):
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        return ready

    def get(self, handle):
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def close(self):
        if self.owns:
            self.ray.shutdown()
