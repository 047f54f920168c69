"""fer_ray's footprint on a Ray cluster: the placement groups and autoscaler resource requests of every Ray Train run
it starts, recorded in the experiment's storage and released when the trial ends and at the end of every stage.

Why: a Tune scheduler stops a trial (ASHA, including at ``max_t``; synchronous halving's pause) by killing its trial
driver. The Train V2 controller, an actor owned by that driver, dies with it without removing its worker group's
placement group (a placement group whose creator is an actor lives until that actor *and* its job are gone: the
sweep's driver job lives on), and Ray Train's ``PlacementGroupCleaner`` relies on the State API (it fails e.g. when
the head runs with a non-default ``--temp-dir`` and then never exits). The controller's ``request_resources()``
bundles stay in Ray's autoscaling coordinator (a detached actor) for up to 180 s, re-asserted every 20 s. On an
autoscaling cluster the next stage's tasks then wait behind the dead trials' bundles and the cluster never scales down.

The ledger (one small JSON per Train run, ``footprint/<trial_id>/<run_id>.json`` in the experiment, so any driver on
any node reads it) is written from inside the controller by ``FootprintCallback``: ``trial_id``, ``group``,
``run_id``, ``requester_id`` (``train-<run_id>``: Ray Train's coordinator key), ``controller_actor_id`` and
``placement_group_ids``. A run that ends normally releases and deletes its own entry. ``release`` removes, for each
entry whose controller is dead, the recorded placement groups and those the controller created (read from the GCS
table, so one still pending when the trial was killed is found too), cancels the coordinator request and deletes the
entry. It never touches a placement group or request fer_ray did not record, and needs no State API (only the GCS).

Private Ray APIs used here are listed, and checked, in ``tests/test_autoscaling.py::test_ray_internals_footprint``.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Iterable

import ray
from ray import tune

# Private: Ray Train has no public controller/worker-group callback; DataParallelTrainer appends non-UserCallback
# entries of RunConfig.callbacks to its internal list "so custom workarounds built on top of internal callbacks work".
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from fer_ray.experiment import Experiment, as_experiment

log = logging.getLogger(__name__)

LEDGER = "footprint"
"""The ledger's folder in the experiment: ``footprint/<trial_id>/<run_id>.json``."""
COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")
"""(name, namespace) of Ray's detached autoscaling coordinator actor (ray.data's default_autoscaling_coordinator)."""
CALL_TIMEOUT_S = 10.0


def entry_rel(trial_id: str, run_id: str) -> str:
    return posixpath.join(LEDGER, trial_id, f"{run_id}.json")


class FootprintCallback(ControllerCallback, WorkerGroupCallback):
    """Runs inside a Train V2 controller: records the run (at controller start) and each worker group's placement
    group (at worker-group start) in the ledger; a run that finishes normally releases and deletes its own entry.
    A failure to write is logged, never raised: it must not fail the training run."""

    def __init__(self, exp: Experiment | str, trial_id: str, group: str = ""):
        self.exp_uri = as_experiment(exp).uri
        self.entry = {"trial_id": trial_id, "group": group, "placement_group_ids": []}

    def _write(self) -> None:
        try:
            Experiment(self.exp_uri).write_json(entry_rel(self.entry["trial_id"], self.entry["run_id"]), self.entry)
        except Exception as e:  # a storage hiccup must not fail the run
            log.warning("fer_ray footprint: could not record %s: %s", self.entry, e)

    def after_controller_start(self, train_run_context) -> None:
        run_id = train_run_context.run_id
        self.entry |= {"run_id": run_id, "requester_id": f"train-{run_id}",
                       "controller_actor_id": ray.get_runtime_context().get_actor_id(),
                       "controller_worker_id": ray.get_runtime_context().get_worker_id(), "started_at": time.time()}
        self._write()

    def after_worker_group_start(self, worker_group) -> None:
        try:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            self.entry["placement_group_ids"].append(pg.id.hex())
        except Exception as e:
            log.warning("fer_ray footprint: no placement group found for %s: %s", self.entry.get("run_id"), e)
            return
        self._write()

    def after_controller_finish(self, result) -> None:
        if "run_id" not in self.entry:
            return
        try:  # Ray removed the worker group's placement group and cancelled its request; make sure, then forget it
            _release_entry(Experiment(self.exp_uri), entry_rel(self.entry["trial_id"], self.entry["run_id"]),
                           self.entry)
        except Exception as e:  # the stage-end release retries it
            log.warning("fer_ray footprint: could not release finished run %s: %s", self.entry["run_id"], e)


# -- reading the cluster through the GCS (no State API) --------------------------------------------------------------
def _gcs_placement_groups() -> list:
    """Every placement group in the GCS table, as ``PlacementGroupTableData`` protos (they carry the creator actor,
    which ``ray.util.placement_group_table`` leaves out)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    return [gcs_pb2.PlacementGroupTableData.FromString(b) for b in accessor.get_placement_group_table()]


def placement_groups_of(entry: dict) -> dict[str, str]:
    """Placement group id (hex) → state of every placement group ``entry`` recorded or its controller created,
    except those already removed."""
    from ray.core.generated import gcs_pb2

    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    recorded = set(entry.get("placement_group_ids", []))
    creator = entry.get("controller_actor_id")
    out = {}
    for pg in _gcs_placement_groups():
        pg_id = pg.placement_group_id.hex()
        if pg.state != removed and (pg_id in recorded or (creator and pg.creator_actor_id.hex() == creator)):
            out[pg_id] = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(pg.state)
    return out


def controller_alive(entry: dict) -> bool:
    """Whether the entry's controller actor may still run (any state but DEAD; unknown counts as dead)."""
    from ray._private.state import state

    actor_id = entry.get("controller_actor_id")
    return bool(actor_id) and state.actor_table(actor_id).get("State", "DEAD") != "DEAD"


def coordinator():
    """Ray's autoscaling coordinator actor, or ``None`` when none was ever started on this cluster."""
    try:
        return ray.get_actor(COORDINATOR[0], namespace=COORDINATOR[1])
    except ValueError:
        return None


def standing_requests() -> dict[str, list[dict]]:
    """Requester id → the bundles the autoscaling coordinator keeps requesting for it (reads the actor's private
    ``_ongoing_reqs``: for tests and diagnostics)."""
    actor = coordinator()
    if actor is None:
        return {}
    try:
        return ray.get(actor.__ray_call__.remote(lambda self: {k: list(v.requested_resources)
                                                               for k, v in self._ongoing_reqs.items()}),
                       timeout=CALL_TIMEOUT_S)
    except ray.exceptions.RayActorError:  # it died with its node: it holds nothing
        return {}


def cleaners_of(entry: dict) -> list[str]:
    """Actor ids (hex) of the live ``PlacementGroupCleaner`` actors the entry's controller started: Ray Train starts
    one detached cleaner per run; where its State API query fails (it found another Ray instance on the host, or
    none) its monitor thread dies and the actor never exits: a process on the head per run. fer_ray has no handle
    to end it with (it is anonymous), so ``release`` reports it."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    worker = entry.get("controller_worker_id")
    if not worker:
        return []
    dead = gcs_pb2.ActorTableData.DEAD
    accessor = state._connect_and_get_accessor()
    table = [gcs_pb2.ActorTableData.FromString(b) for b in accessor.get_actor_table(None, None)]
    return [a.actor_id.hex() for a in table if a.class_name == "PlacementGroupCleaner" and a.state != dead
            and a.owner_address.worker_id.hex() == worker]


def _coordinator_node() -> str | None:
    from ray._private.state import state

    actor = coordinator()
    return None if actor is None else state.actor_table(actor._actor_id.hex()).get("Address", {}).get("NodeID")


def place_coordinator_on_head() -> None:
    """Create Ray's autoscaling coordinator on the head before any trial asks for it. Whoever asks first creates it,
    pinned to the asker's node: a trial's controller runs on a worker node, and a live actor keeps its node busy, so
    that node would never scale down. Created from a task on the head, it lives where drivers and Ray Train's own
    detached helpers live. One already running elsewhere is left alone (it may hold others' requests): a warning
    names its node."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_NODE_RESOURCE_NAME in n["Resources"]),
                None)
    if head is None:
        return
    if coordinator() is None:
        ray.get(_create_coordinator.options(resources={HEAD_NODE_RESOURCE_NAME: 0.001}).remote(),
                timeout=60)
    node = _coordinator_node()
    if node and node != head:
        log.warning("Ray's autoscaling coordinator (a detached actor) runs on worker node %s: that node cannot scale "
                    "down while it lives", node)


@ray.remote(num_cpus=0)
def _create_coordinator() -> None:
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("fer_ray"), timeout=60)


# -- release ---------------------------------------------------------------------------------------------------------
def _release_entry(exp: Experiment, rel: str, entry: dict) -> dict[str, int]:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    pgs = placement_groups_of(entry)
    for pg_id, pg_state in pgs.items():
        log.warning("fer_ray footprint: removing placement group %s (%s) left by trial %s (Train run %s)", pg_id,
                    pg_state, entry.get("trial_id"), entry.get("run_id"))
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
    cancelled = 0
    actor = coordinator()
    if actor is not None and entry.get("requester_id"):
        try:
            ray.get(actor.cancel_request.remote(entry["requester_id"]), timeout=CALL_TIMEOUT_S)
            cancelled = 1
        except ray.exceptions.RayActorError:  # it died with its node: it holds nothing of this run any more
            pass
    cleaners = cleaners_of(entry)
    if cleaners and not controller_alive(entry):  # no handle to end them with: say so (they hold no resources)
        log.warning("fer_ray footprint: Ray Train's PlacementGroupCleaner %s of Train run %s is alive with its "
                    "controller dead: it exits once its State API lookup finds the controller gone; where that lookup "
                    "fails (no RAY_ADDRESS in the job's runtime_env, several Ray instances on the host) it stays on "
                    "the head", ", ".join(cleaners), entry.get("run_id"))
    exp.delete(rel)
    return {"placement_groups": len(pgs), "requests": cancelled, "cleaners_alive": len(cleaners), "entries": 1}


def ledger(exp: Experiment | str, trial_ids: Iterable[str] | None = None) -> dict[str, dict]:
    """Ledger path → entry, for ``trial_ids`` (all when ``None``)."""
    exp = as_experiment(exp)
    wanted = None if trial_ids is None else set(trial_ids)
    out = {}
    for rel in exp.files(LEDGER, recursive=True):
        if rel.endswith(".json") and (wanted is None or posixpath.basename(posixpath.dirname(rel)) in wanted):
            try:
                out[rel] = exp.read_json(rel)
            except (ValueError, OSError) as e:  # a half-written entry: the next release reads it
                log.warning("fer_ray footprint: unreadable %s: %s", rel, e)
    return out


def release(exp: Experiment | str, trial_ids: Iterable[str] | None = None, wait_s: float = 0.0) -> dict[str, int]:
    """Remove the placement groups and withdraw the resource requests of the recorded Train runs of ``trial_ids``
    (every recorded run when ``None``) whose controller is dead, then forget them. ``wait_s``: wait up to this long
    for controllers still alive to die (a stopped trial's controller dies a moment after its driver); runs still
    alive after that are left as they are. Returns counts: placement groups removed, coordinator cancels sent, Ray
    Train cleaner actors still alive (``cleaners_of``: reported, not ended), entries forgotten, entries left because
    their controller is alive. Needs a connected Ray."""
    exp = as_experiment(exp)
    entries = ledger(exp, trial_ids)
    done = {"placement_groups": 0, "requests": 0, "cleaners_alive": 0, "entries": 0, "alive": 0}
    deadline = time.monotonic() + wait_s
    while entries:
        for rel, entry in list(entries.items()):
            if not controller_alive(entry):
                for k, v in _release_entry(exp, rel, entry).items():
                    done[k] += v
                del entries[rel]
        if not entries or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    done["alive"] = len(entries)
    if done["placement_groups"] or done["requests"]:
        log.info("fer_ray footprint: released %s", done)
    return done


class ReleaseStopped(tune.Callback):
    """In the sweep's driver: releases the recorded Train runs of every trial that is not running (terminated,
    errored, stopped by ASHA, paused by synchronous halving) as soon as it stops, and every ``every_s`` seconds
    after each step of Tune's loop (a stopped trial's controller dies a moment after Tune reports the trial)."""

    def __init__(self, exp: Experiment | str, every_s: float = 5.0):
        self.exp_uri, self.every_s, self._last = as_experiment(exp).uri, every_s, 0.0

    def _release(self, trials: list) -> None:
        self._last = time.monotonic()
        stopped = {t.trial_id for t in trials if t.status != t.RUNNING}
        try:
            exp = Experiment(self.exp_uri)
            if stopped and stopped & set(exp.dirs(LEDGER)):
                release(exp, stopped)
        except Exception as e:  # best effort: the next step, and the end of the sweep, retry
            log.warning("fer_ray footprint: release failed (retried): %s", e)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._release(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._release(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._release(trials)


def start_stage(exp: Experiment | str, autoscaled: bool) -> None:
    """Before a sweep's trials start: release what earlier drivers' trials left (a killed driver, ``--resume``) and,
    on a cluster that can grow, put Ray's autoscaling coordinator on the head (``place_coordinator_on_head``).
    Logs instead of raising."""
    release_quietly(exp)
    if autoscaled:
        try:
            place_coordinator_on_head()
        except Exception as e:  # the sweep runs regardless; only scaling down may suffer
            log.warning("fer_ray footprint: could not place Ray's autoscaling coordinator on the head: %s", e)


def release_quietly(exp: Experiment | str, trial_ids: Iterable[str] | None = None, wait_s: float = 0.0) -> None:
    """``release``, logging instead of raising: what a stage does at its start and end."""
    try:
        release(exp, trial_ids, wait_s)
    except Exception as e:  # releasing is best effort; the next stage retries it
        log.warning("fer_ray footprint: release failed (the next stage retries): %s", e)
