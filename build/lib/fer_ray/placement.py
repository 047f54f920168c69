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
   GPUs if enough for the trial, else the most GPUs in total; none present: the first listed that the autoscaler
   can add (``autoscaler_node_types``), or the first listed when its node types are unknown.

An explicit ``train.accelerator_type`` wins over the rules; CPU trials are never pinned. On the worker,
``cap_batch_size`` lowers ``batch_size`` to the rule's ``batch_size_cap`` per GPU for its GPU type.

Before any trial starts, ``check_feasible`` stops a sweep with one line when a trial can never be placed: on a local
Ray against its nodes, on an autoscaling cluster against its live nodes and the node types its autoscaler can add
(read from the autoscaling config, ``autoscaler_node_types``); where those are unknown it warns and waits.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fer_ray.config import PlacementRule, TrainConfig

log = logging.getLogger(__name__)

RESOURCE_PREFIX = "accelerator_type:"
AUTOSCALING_CONFIG_ENV = "FER_RAY_AUTOSCALING_CONFIG"
"""The cluster config the autoscaler runs with (a path); unset, ``BOOTSTRAP_CONFIG`` where it exists."""
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where Ray's cluster launcher puts the autoscaler's config on the head (where ``ray job submit`` runs drivers;
Ray Tune's ``is_ray_cluster`` looks for the same file)."""


def node_accelerator(resources: dict) -> str | None:
    """The accelerator type a node's (or node type's) resources name (``accelerator_type:<X>``), ``None`` for none."""
    types = sorted(k[len(RESOURCE_PREFIX):] for k in resources if k.startswith(RESOURCE_PREFIX))
    return ",".join(types) or None


def autoscaler_node_types(path: str | None = None) -> dict[str, dict] | None:
    """Worker node type → ``{"resources", "max_workers"}`` of the autoscaler's cluster config (``path``, else
    ``$FER_RAY_AUTOSCALING_CONFIG``, else ``BOOTSTRAP_CONFIG`` if present); the head type and types that may not
    start (``max_workers: 0``) are left out. ``None`` when no config is found or a type's resources are not in it
    (the launcher fills them in at run time on some clouds): then nothing is decided from node types. A config
    named by the variable that cannot be read stops with one line naming it."""
    import yaml

    from fer_ray.config import ConfigError

    path = path or os.environ.get(AUTOSCALING_CONFIG_ENV)
    if not path:
        default = Path(BOOTSTRAP_CONFIG).expanduser()
        if not default.is_file():
            return None
        path = str(default)
    try:
        config = yaml.safe_load(Path(path).read_text())
        types = config["available_node_types"]
        head = config.get("head_node_type")
        out = {name: {"resources": dict(t.get("resources") or {}), "max_workers": int(t.get("max_workers", 0))}
               for name, t in types.items() if name != head and t.get("max_workers", 0) > 0}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{path} ({AUTOSCALING_CONFIG_ENV}): not an autoscaling cluster config with "
                          f"available_node_types ({type(e).__name__}: {e})") from None
    if any(not t["resources"] for t in out.values()):
        log.info("%s: a node type has no resources listed; node types are not used to place trials", path)
        return None
    return out


def launchable_types(node_types: dict[str, dict] | None) -> set[str] | None:
    """The accelerator types the autoscaler can add (``None``: unknown)."""
    if node_types is None:
        return None
    return {t for nt in node_types.values() for t in (node_accelerator(nt["resources"]) or "").split(",") if t}


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


def place(cfg: TrainConfig, rule: PlacementRule | None, gpus: dict[str, tuple[float, float]],
          launchable: set[str] | None = None) -> TrainConfig:
    """``cfg`` with ``accelerator_type`` set when the trial must be pinned to one GPU type; ``launchable``: the
    types the autoscaler can add (``launchable_types``), so an allowed type no node has nor can have is passed over."""
    if not cfg.use_gpu or cfg.accelerator_type:
        return cfg
    candidates = rule.allowed() if rule else None
    if candidates and launchable is not None:
        candidates = [t for t in candidates if t in gpus or t in launchable] or candidates
    chosen = pick_type(candidates, gpus, gpus_needed(cfg))
    return cfg.replace(accelerator_type=chosen) if chosen else cfg


def place_in_cluster(cfg: TrainConfig, rule: PlacementRule | None, launchable: set[str] | None = None) -> TrainConfig:
    """``place`` against the connected Ray cluster (CPU runs skip the cluster query)."""
    return place(cfg, rule, cluster_gpus(), launchable) if cfg.use_gpu else cfg


def trial_resources(cfg: TrainConfig, rule: PlacementRule | None, gpus: dict[str, tuple[float, float]],
                    launchable: set[str] | None = None) -> dict:
    """Resources of a trial driver: 0.1 CPU, or in local mode (``num_workers == 0``) the worker's own share."""
    if cfg.num_workers > 0:
        return {"CPU": 0.1}
    cfg = place(cfg, rule, gpus, launchable)
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


def infeasible(cfg: TrainConfig, rule: PlacementRule | None, nodes: list[dict],
               node_types: dict[str, dict] | None = None) -> str | None:
    """Why a trial can never be placed on ``nodes`` (live nodes' resources) plus, when known, every node the
    autoscaler may add (``node_types``, each counted ``max_workers`` times), or ``None`` when it fits: each worker's
    CPUs and GPU share on one node and the trial's total; a GPU trial with allowed types (its ``accelerator_type``
    or ``rule``) on the nodes of one allowed type."""
    shapes = [(n, 1) for n in nodes] + [(t["resources"], t["max_workers"]) for t in (node_types or {}).values()]
    node = "node or node type" if node_types is not None else "node"
    allowed = None
    if cfg.use_gpu:
        allowed = [cfg.accelerator_type] if cfg.accelerator_type else rule.allowed() if rule else None
    if not allowed:
        return _shortfall(cfg, shapes, node, "the cluster can grow to" if node_types is not None else "the cluster has")
    present = sorted({t for s, _ in shapes for t in (node_accelerator(s) or "").split(",") if t})
    problems = [_shortfall(cfg, [(s, n) for s, n in shapes if RESOURCE_PREFIX + t in s], f"{t} {node}",
                           f"{t} nodes hold") for t in allowed if t in present]
    if not problems:
        return f"it may run on GPU types {', '.join(allowed)} but no {node} has one (GPU types: " \
               f"{', '.join(present) or 'none'})"
    return None if None in problems else problems[0]


def _shortfall(cfg: TrainConfig, shapes: list[tuple[dict, int]], node: str, where: str) -> str | None:
    """``infeasible`` on ``shapes`` (resources, how many such nodes): a worker beyond the largest, or the trial
    beyond the total."""
    cpus, gpus, workers = trial_demand(cfg)
    per_worker = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpu_fraction if cfg.use_gpu else 0.0}
    total = {k: sum(s.get(k, 0) * n for s, n in shapes) for k in ("CPU", "GPU")}
    biggest = {k: max((s.get(k, 0) for s, _ in shapes), default=0) for k in ("CPU", "GPU")}
    problem = next((f"each worker asks for {per_worker[k]:g} {k} but the largest {node} has {biggest[k]:g}"
                    for k in ("GPU", "CPU") if per_worker[k] > biggest[k]), None)
    return problem or next((f"a trial asks for {need:g} {k} ({workers} worker(s)) but {where} {total[k]:g}"
                            for k, need in (("GPU", gpus), ("CPU", cpus)) if need > total[k]), None)


def check_feasible(configs: list[TrainConfig], autoscaled: bool, node_types: dict[str, dict] | None = None,
                   rule_for=None) -> None:
    """Stop with one line before any trial starts when a trial can never be placed (``infeasible``; ``rule_for``:
    model → its ``PlacementRule``): on a Ray with no autoscaler, or on one whose node types are known
    (``autoscaler_node_types``) and none can hold it, it would wait forever. With an autoscaler whose node types are
    unknown it only says so and waits."""
    import ray

    from fer_ray.config import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for cfg in configs:
        problem = infeasible(cfg, rule_for(cfg.model) if rule_for else None, nodes,
                             node_types if autoscaled else None)
        if problem and not autoscaled:
            raise ConfigError(f"train ({cfg.model}): {problem}; this local Ray cannot grow, so the sweep would wait "
                              "forever (lower num_workers/cpus_per_worker, drop use_gpu, or connect to a cluster "
                              "with RAY_ADDRESS)")
        if problem and node_types is not None:
            raise ConfigError(f"train ({cfg.model}): {problem}; no node type of this cluster's autoscaler "
                              f"({', '.join(node_types) or 'none'}) can ever hold it, so the sweep would wait forever "
                              "(change the trial's resources or placement, or add a node type)")
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
