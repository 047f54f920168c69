"""The one owner of the Ray session (what fer_ray leaves on it, and takes back, is ``fer_ray.footprint``'s).

``init_ray`` joins the cluster at ``RAY_ADDRESS`` (``ray job submit``) or starts a local Ray bound to 127.0.0.1,
and records which of the two it did (``STARTED_LOCAL_RAY``: read it as ``cluster.STARTED_LOCAL_RAY``, a module
attribute, since ``init_ray`` sets it later); the storage credentials of this environment (``FORWARDED_ENV``)
travel to every worker through the job's runtime_env, as Ray does not forward the driver's environment.
``put_dataset`` puts the one object-store copy of the prepared dataset (``fer_ray.data.prepare``) that every trial
and worker of a sweep reads.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import ray

from fer_ray.data import FERData

FORWARDED_ENV = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GCS_", "AZURE_STORAGE_")
"""Environment variables (prefixes) handed to every Ray worker, so trials and inference tasks reach the same
bucket as the driver: Ray does not forward the driver's environment to its workers."""

STARTED_LOCAL_RAY = False
"""True once this process started its own local Ray (nothing can add nodes to it)."""


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
    # address="local": a new Ray of this process's own, even when a `ray start` cluster runs on this host (without
    # it ray.init joins the newest such cluster, and then refuses num_cpus).
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=True,
             dashboard_host="127.0.0.1", **quiet)
    global STARTED_LOCAL_RAY
    STARTED_LOCAL_RAY = True  # no autoscaler: fer_ray.placement.check_feasible fails fast
    # The Train placement-group cleaner and later clients look the cluster up through RAY_ADDRESS.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def put_dataset(data: FERData, splits: dict[str, np.ndarray],
                teacher_logits: np.ndarray | None = None) -> ray.ObjectRef:
    """One object-store copy of the arrays and split indices, shared zero-copy by all trials and workers.

    ``teacher_logits``: optional float32 ``[len(splits["train"]), C]`` for distillation (``fer_ray.distill``).
    """
    extra = {} if teacher_logits is None else {"teacher_logits": np.asarray(teacher_logits, dtype=np.float32)}
    return ray.put({**data.to_arrays(), "splits": splits, **extra})
