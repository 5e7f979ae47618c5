import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs) per test module."""
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=f"/tmp/nlray-t{os.getuid()}")
    yield ray
    ray.shutdown()
