"""fer_ray leans on a few private Ray APIs where no public one does the job; each use is listed here, with why, so
that a Ray upgrade that moves or changes one fails this fast test instead of a sweep on a cluster.

- ``SuccessiveHalving`` (``fer_ray.schedulers``) is one HyperBand bracket: Tune has no public synchronous
  successive-halving scheduler, and its ``HyperBandScheduler`` builds brackets through ``_create_bracket`` /
  ``_Bracket`` and reads ``_s_max_1``, ``_get_n0``, ``_get_r0`` (overridden) and ``_process_bracket``.
- ``fer_ray.placement.cluster_gpus`` reads per-node total and available resources through ``ray._private.state``
  (the public ``ray.nodes()`` has no per-node availability).
- ``fer_ray.gpu.accelerator_type`` names a CUDA device as Ray does (``NvidiaGPUAcceleratorManager``), so batch caps
  keyed by Ray's accelerator type find the GPU a worker got.
- ``fer_ray.gpu.inventory`` reads the machine's GPUs through Ray's copy of pynvml; ``fer_ray.nodes`` replaces
  ``NvidiaGPUAcceleratorManager.get_current_node_accelerator_type`` in its ``ray start`` processes, since Ray names
  every GPU node after NVML's device 0 whatever ``CUDA_VISIBLE_DEVICES`` says (``ResourceAndLabelSpec``).
"""

import inspect

from ray.tune.schedulers import HyperBandScheduler


def test_hyperband_internals_that_successive_halving_overrides():
    from ray.tune.schedulers.hyperband import _Bracket

    params = set(inspect.signature(_Bracket.__init__).parameters)
    assert {"time_attr", "max_trials", "init_t_attr", "max_t_attr", "eta", "s", "stop_last_trials"} <= params
    for name in ("_create_bracket", "_process_bracket", "on_trial_add", "on_trial_remove", "choose_trial_to_run"):
        assert callable(getattr(HyperBandScheduler, name, None)), name
    hb = HyperBandScheduler(time_attr="epoch", max_t=8, reduction_factor=2)
    for attr in ("_s_max_1", "_get_n0", "_get_r0", "_time_attr", "_max_t_attr", "_eta", "_stop_last_trials",
                 "_trial_info"):
        assert hasattr(hb, attr), attr
    bracket = _Bracket(time_attr="epoch", max_trials=4, init_t_attr=1, max_t_attr=4, eta=2, s=2,
                       stop_last_trials=True)
    for name in ("cur_iter_done", "finished", "trials_to_unpause"):
        assert hasattr(bracket, name), name
    assert "_create_bracket" in inspect.getsource(HyperBandScheduler), "brackets must still be built through it"


def test_state_api_and_accelerator_names():
    from ray._private import state
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    assert callable(state.total_resources_per_node) and callable(state.available_resources_per_node)
    name = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type
    assert name("NVIDIA A100-SXM4-80GB") == "A100" and name("NVIDIA GeForce RTX 3090") == "GeForce-RTX-3090"


def test_ray_names_a_gpu_node_after_nvml_device_0_unless_fer_ray_fixes_its_type(monkeypatch):
    """On a 3090 (device 0) + 1080 Ti box, a node started for the 1080 Ti alone would also get Ray's own
    ``accelerator_type:GeForce-RTX-3090``; ``fer_ray.nodes.fix_accelerator_type`` gives it its own type only."""
    import ray._private.thirdparty.pynvml as nvml
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as Nvidia
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    from fer_ray.nodes import fix_accelerator_type

    assert callable(nvml.nvmlDeviceGetCudaComputeCapability) and callable(nvml.nvmlDeviceGetMemoryInfo)
    monkeypatch.setattr(Nvidia, "get_current_node_accelerator_type", staticmethod(lambda: "GeForce-RTX-3090"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")

    def node_of_the_1080ti():
        spec = ResourceAndLabelSpec(num_cpus=1, num_gpus=1, resources={"accelerator_type:GeForce-GTX-1080-Ti": 1},
                                    labels={"ray.io/accelerator-type": "GeForce-GTX-1080-Ti"})
        spec.resolve(is_head=False, node_ip_address="127.0.0.1")
        return sorted(k for k in spec.resources if k.startswith("accelerator_type:")), spec.labels

    types, _ = node_of_the_1080ti()
    assert types == ["accelerator_type:GeForce-GTX-1080-Ti", "accelerator_type:GeForce-RTX-3090"], "Ray's own adds one"
    fix_accelerator_type("GeForce-GTX-1080-Ti")  # monkeypatch restores Ray's method afterwards
    types, labels = node_of_the_1080ti()
    assert types == ["accelerator_type:GeForce-GTX-1080-Ti"]
    assert labels["ray.io/accelerator-type"] == "GeForce-GTX-1080-Ti"
