"""Mixed GPUs: placement rules are validated, a trial pins one GPU type, workers cap their batch per GPU type.

The Ray test simulates a three-node cluster (one GPU of type A, two of type B, logical GPUs only) and checks
that a 2-worker GPU trial lands on the two B nodes, never across types.
"""

import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from fer_ray.config import ConfigError, PlacementRule, SweepConfig, TrainConfig
from fer_ray.placement import cap_batch_size, gpus_by_type, pick_type, place, trial_resources

VIT = "timm/vit_base_patch16_224"
RULES = {VIT: {"accelerator_type": ["A100", "GeForce-RTX-3090"], "min_gpu_memory_gb": 16},
         "default": {"batch_size_cap": {"GeForce-GTX-1080-Ti": 64}}}


def test_rules_parse_merge_with_default_and_round_trip():
    cfg = SweepConfig.from_dict({"placement": RULES}, "sweep")
    vit = cfg.rule_for(VIT)
    assert vit.allowed() == ["A100", "GeForce-RTX-3090"]
    assert vit.batch_size_cap == {"GeForce-GTX-1080-Ti": 64}, "caps come from default"
    assert cfg.rule_for("basic_cnn").allowed() is None
    assert SweepConfig().rule_for("basic_cnn") is None
    again = SweepConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), "sweep")
    assert again.placement == cfg.placement


def test_memory_rule_becomes_an_allowed_list():
    assert PlacementRule(min_gpu_memory_gb=40).allowed() == ["A100", "A100-80G", "H100"]
    assert PlacementRule(accelerator_type=["GeForce-GTX-1080-Ti", "T4"], min_gpu_memory_gb=12).allowed() == ["T4"]
    assert PlacementRule(accelerator_type="L4").allowed() == ["L4"]


@pytest.mark.parametrize("placement,msg", [
    ({"default": {"batch_cap": {}}}, r"sweep\.placement\.default: unknown key 'batch_cap'"),
    ({VIT: {"accelerator_type": ["A100", "RTX 3090"]}}, r"placement\.timm/vit_base_patch16_224\.accelerator_type"),
    ({VIT: {"accelerator_type": []}}, r"accelerator_type: must be a non-empty list"),
    ({VIT: {"accelerator_type": ["Fancy-GPU"], "min_gpu_memory_gb": 16}}, r"memory of 'Fancy-GPU' unknown"),
    ({VIT: {"min_gpu_memory_gb": 100}}, r"min_gpu_memory_gb: no allowed GPU type has >= 100 GB"),
    ({VIT: {"min_gpu_memory_gb": 24}, "default": {"accelerator_type": ["T4"]}}, r"with default: min_gpu_memory_gb"),
    ({"default": {"batch_size_cap": {"T4": 0}}}, r"batch_size_cap: must map"),
    ({"default": ["T4"]}, r"placement\.default: must be a mapping"),
])
def test_bad_rules_name_the_field(placement, msg):
    with pytest.raises(ConfigError, match=msg):
        SweepConfig.from_dict({"placement": placement}, "sweep")


def test_train_accelerator_type_is_checked():
    assert TrainConfig(accelerator_type="GeForce-RTX-3090").accelerator_type == "GeForce-RTX-3090"
    with pytest.raises(ConfigError, match="train.accelerator_type: must be a Ray accelerator type name"):
        TrainConfig.from_dict({"accelerator_type": "RTX 3090"}, "train")


def test_gpus_by_type_counts_free_and_total_gpus_per_type():
    total = {"n1": {"CPU": 8, "GPU": 2, "accelerator_type:A100": 1}, "head": {"CPU": 4},
             "n2": {"GPU": 1, "accelerator_type:T4": 1}, "n3": {"CPU": 8, "GPU": 4, "accelerator_type:A100": 1}}
    free = {"n1": {"CPU": 8, "GPU": 1}, "n2": {"CPU": 8}, "n3": {"GPU": 4}}
    assert gpus_by_type(total, free) == {"A100": (5, 6), "T4": (0, 1)}


GPUS = {"A": (1.0, 1.0), "B": (1.0, 2.0), "C": (0.0, 4.0)}


@pytest.mark.parametrize("candidates,gpus,need,expected", [
    (None, GPUS, 1, None),                     # one GPU cannot mix
    (None, {"A": (2.0, 2.0)}, 2, None),        # one type in the cluster: nothing to mix
    (None, GPUS, 2, "C"),                      # nobody has 2 free: the type with the most GPUs (waits)
    (None, {"A": (2.0, 2.0), "B": (3.0, 4.0)}, 2, "B"),  # most free GPUs among those with enough
    (["A", "B"], GPUS, 1, "A"),                # tie on free GPUs: list order
    (["B", "C"], GPUS, 2, "C"),                # B lacks a second free GPU; C has 4 in total
    (["X", "Y"], GPUS, 1, "X"),                # none present: the first listed (an autoscaler may add it)
    (["A", "B"], GPUS, 3, "B"),                # not enough anywhere: the allowed type with the most
])
def test_pick_type(candidates, gpus, need, expected):
    assert pick_type(candidates, gpus, need) == expected


def test_place_pins_gpu_trials_only_and_an_explicit_type_wins():
    two = TrainConfig(num_workers=2, use_gpu=True)
    gpus = {"A": (1.0, 1.0), "B": (2.0, 2.0)}
    assert place(two, None, gpus).accelerator_type == "B"
    assert place(two.replace(use_gpu=False), None, gpus).accelerator_type is None
    assert place(two.replace(accelerator_type="A"), None, gpus).accelerator_type == "A"
    assert place(two, PlacementRule(accelerator_type=["A"]), gpus).accelerator_type == "A"


def test_local_mode_trial_resources_carry_the_gpu_type():
    rule = PlacementRule(accelerator_type=["GeForce-RTX-3090"])
    local = TrainConfig(num_workers=0, use_gpu=True, cpus_per_worker=4)
    assert trial_resources(local, rule, {}) == {"CPU": 4, "GPU": 1, "accelerator_type:GeForce-RTX-3090": 0.001}
    assert trial_resources(local, None, {"A": (1.0, 1.0), "B": (1.0, 1.0)}) == {"CPU": 4, "GPU": 1}
    assert trial_resources(TrainConfig(num_workers=2, use_gpu=True), rule, {}) == {"CPU": 0.1}


def test_scaling_config_requests_the_accelerator_on_every_worker():
    from fer_ray.train import scaling_config

    sc = scaling_config(TrainConfig(num_workers=2, cpus_per_worker=0.5, accelerator_type="B"))
    assert sc._resources_per_worker_not_none == {"CPU": 0.5, "accelerator_type:B": 0.001}


@pytest.mark.parametrize("name,ray_name", [("NVIDIA GeForce GTX 1080 Ti", "GeForce-GTX-1080-Ti"),
                                           ("NVIDIA A100-SXM4-80GB", "A100"), ("Tesla T4", "T4")])
def test_batch_cap_per_gpu_type(monkeypatch, name, ray_name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    cuda = torch.device("cuda", 0)
    cfg = TrainConfig(batch_size=256)
    assert cap_batch_size(cfg, {ray_name: 64}, cuda, world_size=2).batch_size == 128, "64 per GPU × 2 workers"
    assert cap_batch_size(cfg, {ray_name: 512}, cuda).batch_size == 256
    assert cap_batch_size(cfg, {"Other": 8}, cuda).batch_size == 256
    assert cap_batch_size(cfg.replace(accelerator_type="Other"), {"Other": 8}, cuda).batch_size == 8
    assert cap_batch_size(cfg, {ray_name: 64}, torch.device("cpu")).batch_size == 256


@pytest.fixture(scope="module")
def two_type_cluster(no_session_ray):
    """Node A (head, 1 GPU) and nodes B1, B2 (1 GPU each), logical GPUs only: a Ray cluster of its own (the
    session's Ray is stopped meanwhile: ``no_session_ray``)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:A": 1}, "include_dashboard": False})
    b_nodes = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:B": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    os.environ["RAY_ADDRESS"] = cluster.address  # Train's placement-group cleaner finds this instance
    try:
        yield cluster, {n.node_id for n in b_nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


@pytest.mark.ray
def test_two_worker_gpu_trial_stays_on_one_gpu_type(two_type_cluster, tmp_path):
    from ray.train import RunConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from fer_ray.placement import cluster_gpus
    from fer_ray.train import scaling_config

    def where(config: dict) -> None:  # nested: pickled by value (the workers cannot import this test module)
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        (Path(config["out"]) / f"rank{rank}").write_text(ray.get_runtime_context().get_node_id())

    _, b_nodes = two_type_cluster
    deadline = time.time() + 120  # the resource view catches up with new nodes (a second or two; generous)
    while cluster_gpus() != {"A": (1, 1), "B": (2, 2)} and time.time() < deadline:
        time.sleep(0.2)
    assert cluster_gpus() == {"A": (1, 1), "B": (2, 2)}
    cfg = place(TrainConfig(num_workers=2, use_gpu=True, cpus_per_worker=0.5), None, cluster_gpus())
    assert cfg.accelerator_type == "B", "only B has two GPUs"
    DataParallelTrainer(where, train_loop_config={"out": str(tmp_path)}, scaling_config=scaling_config(cfg),
                        run_config=RunConfig(name="where", storage_path=str(tmp_path / "runs"))).fit()
    landed = {p.read_text() for p in tmp_path.glob("rank*")}
    assert landed == b_nodes, "one worker on each B node, none on the A head"


def test_fractional_gpu_trials_ask_for_a_share():
    quarter = TrainConfig(num_workers=0, use_gpu=True, cpus_per_worker=1, gpu_fraction=0.25)
    assert trial_resources(quarter, None, {}) == {"CPU": 1, "GPU": 0.25}
    from fer_ray.inference import task_resources
    from fer_ray.train import scaling_config

    assert task_resources(quarter) == {"num_gpus": 0.25, "num_cpus": 1}
    one_worker = quarter.replace(num_workers=1)
    assert scaling_config(one_worker)._resources_per_worker_not_none == {"CPU": 1, "GPU": 0.25}
    assert place(one_worker, PlacementRule(accelerator_type=["A", "B"]), {"A": (0.0, 1.0), "B": (0.5, 1.0)}
                 ).accelerator_type == "B", "0.25 of a GPU fits where half a GPU is free"
    for bad, msg in (({"gpu_fraction": 0.5, "num_workers": 2}, "single-worker trials"),
                     ({"gpu_fraction": 0.0}, r"must be in \(0, 1\]"), ({"gpu_fraction": 1.5}, r"must be in \(0, 1\]")):
        with pytest.raises(ConfigError, match=f"train.gpu_fraction: .*{msg}"):
            TrainConfig.from_dict(bad, "train")


def test_cli_gpus_per_trial_takes_a_share():
    import argparse

    from fer_ray.cli import _apply_overrides

    args = argparse.Namespace(workers_per_trial=None, gpus_per_trial=0.25, data=None, name=None)
    train = _apply_overrides(SweepConfig(), args).train
    assert (train.use_gpu, train.gpu_fraction, train.num_workers) == (True, 0.25, 0)
    train = _apply_overrides(SweepConfig(), argparse.Namespace(**{**vars(args), "gpus_per_trial": 2.0})).train
    assert (train.use_gpu, train.gpu_fraction, train.num_workers) == (True, 1.0, 2)
    with pytest.raises(ConfigError, match="--gpus-per-trial"):
        _apply_overrides(SweepConfig(), argparse.Namespace(**{**vars(args), "gpus_per_trial": 1.5}))


@pytest.mark.ray
def test_fractional_gpu_trials_share_one_gpu(two_type_cluster):
    """Four trials asking 0.25 GPU each (the resources ``trial_resources`` gives a Tune trial) run at the same time on
    the head's one logical GPU, all seeing the same GPU id. "At the same time" is a barrier, not a clock: each task
    checks in and waits until all four have, which only happens if all four hold their share together."""
    import ray

    from fer_ray.placement import cluster_gpus

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self):
            self.arrived = 0

        def arrive(self) -> None:
            self.arrived += 1

        def count(self) -> int:
            return self.arrived

    @ray.remote
    def trial(barrier, n: int) -> tuple[int, list]:
        ray.get(barrier.arrive.remote())
        give_up = time.time() + 120  # a liveness guard only: four concurrent tasks meet within a second or two
        while ray.get(barrier.count.remote()) < n and time.time() < give_up:
            time.sleep(0.05)
        return ray.get(barrier.count.remote()), ray.get_gpu_ids()

    quarter = TrainConfig(num_workers=0, use_gpu=True, cpus_per_worker=0.25, gpu_fraction=0.25)
    cfg = place(quarter, PlacementRule(accelerator_type=["A"]), cluster_gpus())
    res = trial_resources(cfg, None, {})
    assert res == {"CPU": 0.25, "GPU": 0.25, "accelerator_type:A": 0.001}
    opts = {"num_cpus": res.pop("CPU"), "num_gpus": res.pop("GPU"), "resources": res}
    barrier = Barrier.remote()
    runs = ray.get([trial.options(**opts).remote(barrier, 4) for _ in range(4)])
    assert [seen for seen, _ in runs] == [4] * 4, "all four held their GPU share at the same time"
    assert len({tuple(ids) for _, ids in runs}) == 1, "on the same GPU"


def test_search_space_resource_candidates_are_checked():
    from fer_ray.sweep import trial_configs

    cfg = SweepConfig.from_dict({"search_space": {"num_workers": {"grid": [0, 4]}, "lr": {"choice": [0.1]}}}, "s")
    assert sorted(c.num_workers for c in trial_configs(cfg)) == [0, 2, 4]


ASC_TYPES = {"cpu": {"resources": {"CPU": 2}, "max_workers": 2},
             "gpu_a10g": {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:A10G": 1}, "max_workers": 2},
             "gpu_4x_l4": {"resources": {"CPU": 1, "GPU": 4, "accelerator_type:L4": 4}, "max_workers": 1}}
HEAD = [{"CPU": 0}]


@pytest.mark.parametrize("train,rule,msg", [
    ({"num_workers": 0, "cpus_per_worker": 0.25, "use_gpu": True, "gpu_fraction": 0.25}, ["A10G"], None),
    ({"num_workers": 0, "cpus_per_worker": 0.25, "use_gpu": True, "gpu_fraction": 0.25}, ["T4", "L4"], None),
    ({"num_workers": 2, "cpus_per_worker": 0.5, "use_gpu": True}, ["A10G"], None),  # one GPU on each of 2 nodes
    ({"num_workers": 2, "cpus_per_worker": 0.9}, None, None),
    ({"num_workers": 0, "use_gpu": True}, ["T4"], r"may run on GPU types T4 but no node or node type has one "
                                                   r"\(GPU types: A10G, L4\)"),
    ({"num_workers": 3, "cpus_per_worker": 0.3, "use_gpu": True}, ["A10G"],
     r"a trial asks for 3 GPU \(3 worker\(s\)\) but A10G nodes hold 2"),
    ({"num_workers": 0, "cpus_per_worker": 2, "use_gpu": True}, ["L4"],
     r"each worker asks for 2 CPU but the largest L4 node or node type has 1"),
    ({"num_workers": 0, "cpus_per_worker": 4}, None, r"each worker asks for 4 CPU but the largest node or node type"),
    ({"num_workers": 4, "cpus_per_worker": 1.9}, None, r"a trial asks for 7.7 CPU .* the cluster can grow to 7"),
])
def test_feasible_against_the_autoscalers_node_types(train, rule, msg):
    """What no node type of the autoscaler can ever hold is decided from its node types (a faked table), per
    allowed GPU type for pinned trials; the rest fits."""
    from fer_ray.placement import infeasible

    cfg = TrainConfig.from_dict(train, "train")
    problem = infeasible(cfg, PlacementRule(accelerator_type=rule) if rule else None, HEAD, ASC_TYPES)
    if msg is None:
        assert problem is None
    else:
        assert re.search(msg, problem), problem
    if msg is None and rule:  # and such a trial is pinned to a type the autoscaler can add
        from fer_ray.placement import launchable_types

        placed = place(cfg, PlacementRule(accelerator_type=rule), {}, launchable_types(ASC_TYPES))
        assert placed.accelerator_type == next(t for t in rule if t in {"A10G", "L4"})


def test_check_feasible_fails_fast_only_when_node_types_are_known(monkeypatch, caplog):
    import ray

    from fer_ray.placement import check_feasible

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 0}}])
    t4 = TrainConfig(num_workers=0, use_gpu=True, model="basic_cnn")
    rules = {"basic_cnn": PlacementRule(accelerator_type=["T4"])}.get
    with pytest.raises(ConfigError, match=r"^train \(basic_cnn\): it may run on GPU types T4 .* no node type of this "
                                          r"cluster's autoscaler \(cpu, gpu_a10g, gpu_4x_l4\) can ever hold it"):
        check_feasible([t4], autoscaled=True, node_types=ASC_TYPES, rule_for=rules)
    check_feasible([t4], autoscaled=True, node_types=None, rule_for=rules)  # unknown node types: it waits
    assert "waiting for the autoscaler" in caplog.text
    with pytest.raises(ConfigError, match="this local Ray cannot grow"):
        check_feasible([t4], autoscaled=False, node_types=ASC_TYPES, rule_for=rules)


def test_autoscaler_node_types_from_the_cluster_config(tmp_path, monkeypatch):
    from fer_ray.placement import AUTOSCALING_CONFIG_ENV, autoscaler_node_types
    from fer_ray.testing import autoscaling_config, node_types

    path = tmp_path / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(autoscaling_config(6379, node_types())))
    monkeypatch.setenv(AUTOSCALING_CONFIG_ENV, str(path))
    types = autoscaler_node_types()
    assert set(types) == {"cpu", "gpu_a10g", "gpu_4x_l4"}, "the head type is left out"
    assert types["gpu_4x_l4"]["resources"]["accelerator_type:L4"] == 4 and types["gpu_a10g"]["max_workers"] == 2
    monkeypatch.setenv(AUTOSCALING_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml \(FER_RAY_AUTOSCALING_CONFIG\): not an autoscaling cluster"):
        autoscaler_node_types()
    monkeypatch.delenv(AUTOSCALING_CONFIG_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml: unknown
    assert autoscaler_node_types() is None
    raw = yaml.safe_load(path.read_text())
    raw["available_node_types"]["cpu"].pop("resources")  # filled in by the launcher at run time: unknown
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(raw))
    assert autoscaler_node_types() is None
