"""GPU placement: a trial's DDP group never mixes GPU types; per-architecture allowed types and batch caps.

Ray 2.60 cannot say "all bundles on the same accelerator type": ``accelerator_type`` and ``label_selector`` fix
one value, an ``in(A100,L4)`` label selector lets every bundle choose on its own (a 2-worker trial may still
mix), and ``STRICT_PACK`` rules out multi-node DDP. So each trial pins one type with
``ScalingConfig(accelerator_type=...)`` (a 0.001 ``accelerator_type:<X>`` resource per worker), chosen when the
trial starts (``place``):

1. Candidates: the arch's rule in ``SweepConfig.placement`` (``placement[model]``, fields it leaves out taken from
   ``placement.default``): its ``accelerator_type`` list, less types whose ``fer_ray.names.GPU_MEMORY_GB`` is below
   ``min_gpu_memory_gb``. Without a rule: every GPU type in the cluster, and no pin for single-GPU trials or
   clusters with fewer than two types (nothing to mix).
2. Among candidates present in the cluster (``accelerator_type:*`` node resources), the one with the most free
   GPUs if enough for the trial, else the most GPUs in total; none present: the first listed (for an autoscaler).

An explicit ``train.accelerator_type`` wins over the rules; CPU trials are never pinned. On the worker,
``cap_batch_size`` lowers ``batch_size`` to the rule's ``batch_size_cap`` per GPU for its GPU type.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fer_ray.config import PlacementRule, TrainConfig

log = logging.getLogger(__name__)

RESOURCE_PREFIX = "accelerator_type:"


def gpus_by_type(total: dict[str, dict], free: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Ray accelerator type → (free GPUs, total GPUs), from per-node total and available resource dicts."""
    out: dict[str, tuple[float, float]] = {}
    for node, resources in total.items():
        gpus = resources.get("GPU", 0)
        for key in resources:
            if gpus and key.startswith(RESOURCE_PREFIX):
                name = key[len(RESOURCE_PREFIX):]
                f, t = out.get(name, (0.0, 0.0))
                out[name] = (f + free.get(node, {}).get("GPU", 0), t + gpus)
    return out


def cluster_gpus() -> dict[str, tuple[float, float]]:
    """``gpus_by_type`` of the connected Ray cluster's live nodes."""
    from ray._private import state  # private: ray.nodes() has no per-node availability (tests/test_ray_internals.py)

    return gpus_by_type(state.total_resources_per_node(), state.available_resources_per_node())


def pick_type(candidates: list[str] | None, gpus: dict[str, tuple[float, float]], need: float) -> str | None:
    """The accelerator type a trial needing ``need`` GPUs pins, or ``None`` for no pin (see the module doc)."""
    if candidates is None:
        if need <= 1 or len(gpus) < 2:
            return None
        candidates = sorted(gpus)
    present = [t for t in candidates if t in gpus]
    if not present:
        return candidates[0]
    for i in (0, 1):  # enough free GPUs, else enough in total; ties go to the earlier candidate
        fits = [t for t in present if gpus[t][i] >= need]
        if fits:
            return max(fits, key=lambda t: gpus[t][i])
    best = max(present, key=lambda t: gpus[t][1])
    log.warning("no allowed GPU type has %g GPUs (%s); the trial waits for more %s GPUs", need,
                ", ".join(f"{t}: {gpus[t][1]:g}" for t in present), best)
    return best


def gpus_needed(cfg: TrainConfig) -> float:
    """GPUs a trial holds: one per DDP worker, or its ``gpu_fraction`` of one for a single-worker trial."""
    return cfg.gpu_fraction if cfg.num_workers <= 1 else float(cfg.num_workers)


def place(cfg: TrainConfig, rule: PlacementRule | None, gpus: dict[str, tuple[float, float]]) -> TrainConfig:
    """``cfg`` with ``accelerator_type`` set when the trial must be pinned to one GPU type."""
    if not cfg.use_gpu or cfg.accelerator_type:
        return cfg
    chosen = pick_type(rule.allowed() if rule else None, gpus, gpus_needed(cfg))
    return cfg.replace(accelerator_type=chosen) if chosen else cfg


def place_in_cluster(cfg: TrainConfig, rule: PlacementRule | None) -> TrainConfig:
    """``place`` against the connected Ray cluster (CPU runs skip the cluster query)."""
    return place(cfg, rule, cluster_gpus()) if cfg.use_gpu else cfg


def trial_resources(cfg: TrainConfig, rule: PlacementRule | None, gpus: dict[str, tuple[float, float]]) -> dict:
    """Resources of a trial driver: 0.1 CPU, or in local mode (``num_workers == 0``) the worker's own share."""
    if cfg.num_workers > 0:
        return {"CPU": 0.1}
    cfg = place(cfg, rule, gpus)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpu_fraction} if cfg.use_gpu else {})}
    if cfg.accelerator_type:
        resources[RESOURCE_PREFIX + cfg.accelerator_type] = 0.001
    return resources


def trial_demand(cfg: TrainConfig) -> tuple[float, float, float]:
    """``(CPUs, GPUs, workers)`` one trial holds, and the largest single bundle is one worker's share."""
    gpus = cfg.gpu_fraction if cfg.use_gpu else 0.0
    if cfg.num_workers == 0:
        return cfg.cpus_per_worker, gpus, 1
    return 0.1 + cfg.num_workers * cfg.cpus_per_worker, gpus * cfg.num_workers, cfg.num_workers


def trials_that_fit(configs: list[TrainConfig], resources: dict) -> int:
    """How many trials run at once on a cluster with ``resources`` (``ray.cluster_resources()``): its CPUs (and
    GPUs) over the most any one of ``configs`` holds (``trial_demand``); at least 1."""
    need = {k: max(trial_demand(c)[i] for c in configs) for i, k in enumerate(("CPU", "GPU"))}
    fits = [resources.get(k, 0) / n for k, n in need.items() if n > 0]
    return max(1, math.floor(min(fits) + 1e-9)) if fits else 1


def check_feasible(configs: list[TrainConfig], autoscaled: bool) -> None:
    """Stop with one line before any trial starts when a trial asks for more than the connected cluster has
    (CPUs or GPUs per worker beyond the largest node, or in total): on a Ray with no autoscaler it would wait
    forever. With an autoscaler (or a cluster that may grow) it only says so and waits."""
    import ray

    from fer_ray.config import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    biggest = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    for cfg in configs:
        cpus, gpus, workers = trial_demand(cfg)
        per_worker = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpu_fraction if cfg.use_gpu else 0.0}
        problem = next((f"each worker asks for {per_worker[k]:g} {k} but the largest node has {biggest[k]:g}"
                        for k in ("GPU", "CPU") if per_worker[k] > biggest[k]), None)
        problem = problem or next((f"a trial asks for {need:g} {k} ({workers} worker(s)) but the cluster has "
                                   f"{total[k]:g}" for k, need in (("GPU", gpus), ("CPU", cpus)) if need > total[k]),
                                  None)
        if problem and not autoscaled:
            raise ConfigError(f"train ({cfg.model}): {problem}; this local Ray cannot grow, so the sweep would wait "
                              "forever (lower num_workers/cpus_per_worker, drop use_gpu, or connect to a cluster "
                              "with RAY_ADDRESS)")
        if problem:
            log.warning("%s: waiting for the autoscaler to add a node that fits (Ctrl-C to stop)", problem)


def cap_batch_size(cfg: TrainConfig, caps: dict[str, int] | None, device: torch.device, world_size: int = 1
                   ) -> TrainConfig:
    """``cfg`` with ``batch_size`` ≤ cap × ``world_size`` for this GPU's type (``cfg.accelerator_type`` or the
    device's Ray name); every rank gets the same answer since a trial holds one GPU type."""
    if not caps or device.type != "cuda":
        return cfg
    from fer_ray.gpu import accelerator_type

    names = [cfg.accelerator_type, accelerator_type(device)]
    cap = next((caps[n] for n in names if n in caps), None)
    if cap is None or cap * world_size >= cfg.batch_size:
        return cfg
    log.warning("batch_size %d capped to %d (%d per %s GPU)", cfg.batch_size, cap * world_size, cap,
                next(n for n in names if n in caps))
    return cfg.replace(batch_size=cap * world_size)
