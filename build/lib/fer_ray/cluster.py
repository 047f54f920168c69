"""The one owner of the Ray session (what fer_ray leaves on it, and takes back, is ``fer_ray.footprint``'s).

``init_ray`` joins the cluster at ``RAY_ADDRESS`` (``ray job submit``) or starts a local Ray bound to 127.0.0.1,
and records which of the two it did (``STARTED_LOCAL_RAY``: read it as ``cluster.STARTED_LOCAL_RAY``, a module
attribute, since ``init_ray`` sets it later); the storage credentials of this environment (``FORWARDED_ENV``)
travel to every worker through the job's runtime_env, as Ray does not forward the driver's environment.
``put_dataset`` puts the one object-store copy of the prepared dataset (``fer_ray.data.prepare``) that every trial
and worker of a sweep reads.

On a box with several GPU types (or GPUs the installed torch cannot drive), the local Ray is one node per GPU type
(``fer_ray.nodes``, from ``fer_ray.gpu.inventory``): ``init_ray`` starts them, connects, and ends them (by their
sessions' ids) at ``stop_local_nodes`` or when the process exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

import numpy as np
import ray

from fer_ray.data import FERData

FORWARDED_ENV = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GCS_", "AZURE_STORAGE_", "FER_RAY_STORAGE_RETRY_S")
"""Environment variables (prefixes) handed to every Ray worker, so trials and inference tasks reach the same
bucket as the driver and wait out its outages as long (``fer_ray.storage``): Ray does not forward the driver's
environment to its workers."""

STARTED_LOCAL_RAY = False
"""True once this process started its own local Ray (nothing can add nodes to it)."""
LOCAL_NODES = None
"""The ``fer_ray.nodes.LocalNodes`` this process started (one Ray node per GPU type), or ``None``."""
log = logging.getLogger(__name__)


def storage_env() -> dict[str, str]:
    """The variables of this environment that ``FORWARDED_ENV`` names."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, verbose: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` when set (a cluster, ``ray job submit``), else start a local Ray on 127.0.0.1.

    Storage credentials in this environment (``FORWARDED_ENV``) go to every worker through the job's runtime_env.
    ``verbose``: stream the workers' logs and Ray's INFO messages to this process (otherwise warnings and errors
    only; progress is printed by the driver, ``fer_ray.sweep.EpochLines``).
    """
    if ray.is_initialized():
        return
    env = storage_env()
    address = os.environ.get("RAY_ADDRESS")
    if address and "://" not in address and address != "auto":
        # A cluster's GCS address for the job's workers too: Ray Train's placement-group cleaner (a detached actor
        # the trials' controllers start) finds its cluster through it, and not by guessing among the Rays on a host.
        env["RAY_ADDRESS"] = address
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING,
             "runtime_env": {"env_vars": env} if env else None}
    if address:
        ray.init(**quiet)
        return
    global STARTED_LOCAL_RAY
    from fer_ray import gpu, nodes

    plan = nodes.plan_nodes(gpu.inventory(), num_cpus or os.cpu_count() or 1)
    for line in plan.left_out:
        log.warning(line)
    if plan.in_process:
        # address="local": a new Ray of this process's own, even when a `ray start` cluster runs on this host
        # (without it ray.init joins the newest such cluster, and then refuses num_cpus).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                 num_gpus=plan.num_gpus if num_gpus is None else num_gpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", **quiet)
    else:
        _start_local_nodes(plan, quiet)
    STARTED_LOCAL_RAY = True  # no autoscaler: fer_ray.placement.check_feasible fails fast
    # The Train placement-group cleaner and later clients look the cluster up through RAY_ADDRESS.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _start_local_nodes(plan, init_kwargs: dict, timeout_s: float = 120.0) -> None:
    """Start ``plan``'s nodes (``fer_ray.nodes.start_nodes``), connect to their head with token authentication (as
    Ray's own local ``ray.init`` uses it), and wait until every node has joined."""
    from ray._raylet import Config

    from fer_ray import nodes

    global LOCAL_NODES
    LOCAL_NODES = nodes.start_nodes(plan)
    atexit.register(stop_local_nodes)
    for n in plan.nodes:
        log.info("local Ray node: %s", n.describe())
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray reads RAY_AUTH_MODE when its config is initialized (at import)
    ray.init(address=LOCAL_NODES.gcs_address, **init_kwargs)
    deadline = time.monotonic() + timeout_s  # a liveness guard: workers register within seconds
    while sum(n["Alive"] for n in ray.nodes()) < len(plan.nodes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {len(plan.nodes)} local Ray nodes "
                               f"joined within {timeout_s:.0f}s (logs: {LOCAL_NODES.temp_dir})")
        time.sleep(0.2)


def stop_local_nodes() -> None:
    """Disconnect and end the per-GPU-type nodes this process started (nothing else); a no-op without them."""
    global LOCAL_NODES
    if LOCAL_NODES is None:
        return
    ray.shutdown()
    if os.environ.get("RAY_ADDRESS") == LOCAL_NODES.gcs_address:
        os.environ.pop("RAY_ADDRESS")
    LOCAL_NODES.stop()
    LOCAL_NODES = None


def put_dataset(data: FERData, splits: dict[str, np.ndarray],
                teacher_logits: np.ndarray | None = None) -> ray.ObjectRef:
    """One object-store copy of the arrays and split indices, shared zero-copy by all trials and workers.

    ``teacher_logits``: optional float32 ``[len(splits["train"]), C]`` for distillation (``fer_ray.distill``).
    """
    extra = {} if teacher_logits is None else {"teacher_logits": np.asarray(teacher_logits, dtype=np.float32)}
    return ray.put({**data.to_arrays(), "splits": splits, **extra})
