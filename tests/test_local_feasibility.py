"""A trial the local Ray fer_ray started can never hold stops at once (``fer_ray.placement.check_feasible``).

Its own module, on the session's Ray only: tests/test_placement.py's module-scoped cluster of its own would still be
connected when these ran there, and they are about the local Ray fer_ray starts (``cluster.STARTED_LOCAL_RAY``).
"""

import pytest

from fer_ray.config import ConfigError, SweepConfig


@pytest.mark.ray
@pytest.mark.parametrize("train,msg", [
    ({"use_gpu": True, "num_workers": 1}, r"each worker asks for 1 GPU but the largest node has 0"),
    ({"num_workers": 0, "cpus_per_worker": 3}, r"each worker asks for 3 CPU but the largest node has 2"),
    ({"num_workers": 3, "cpus_per_worker": 0.9}, r"a trial asks for 2.8 CPU \(3 worker\(s\)\) but the cluster has 2"),
])
def test_a_request_this_local_ray_can_never_meet_stops_at_once(ray_session, tmp_path, train, msg):
    """On the local 2-CPU Ray fer_ray started (no autoscaler), an impossible trial stops with one line before any
    data is shared or trial started, instead of waiting forever for a node."""
    from fer_ray.sweep import run_sweep

    cfg = SweepConfig.from_dict({"name": "big", "data": {"synthetic_n": 100, "cache_dir": str(tmp_path / "c")},
                                 "train": {"model": "basic_cnn", "epochs": 1, **train}, "asha": {"max_t": 1}}, "s")
    with pytest.raises(ConfigError, match=msg + r".*this local Ray cannot grow"):
        run_sweep(cfg, tmp_path / "big")
    assert not (tmp_path / "big" / "tune").exists(), "no trial was started"
