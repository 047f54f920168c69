"""``Experiment``: the one owner of an experiment's results layout, on any storage (local, NFS, ``s3://``, ``gs://``).

An experiment lives under one root location (``fer_ray.storage``: a path or a URI such as
``s3://bucket/runs/smoke?region=us-east-1&endpoint_override=127.0.0.1:9000&scheme=http``). Ray Tune and Ray Train
persist into the same root, so the driver, every trial and every inference task read and write the same files
whichever node they run on; nothing assumes another process's disk. This class is the only code that knows the
file names::

    sweep.yaml          the resolved sweep config (``--resume`` and the later stages read it back)
    split_roles.json    {"train": "fit", "val": "select", "public_test": "report", ...}
    data.json           data source, split sizes and class counts; ``external`` splits (``fer-ray evaluate``)
    tune/               Ray Tune's experiment state; tune/<trial_id>/checkpoint_*/ for in-process trials
    train/train_<trial_id>/epoch_NNN/   Ray Train's run and checkpoints of each DDP trial
    trials/<trial_id>/  history.json (per-epoch metrics, written by rank 0 each epoch), metrics.parquet
    trials.parquet      one row per trial: arch, img_size, params, GMACs, best val acc/epoch, checkpoint location
    library.parquet     the checkpoint library: one row per extra member (a kept epoch, or EMA weights) of a trial
    logits/<member>/<split>.parquet   the TTA logit store (format: ``fer_ray.store``)
    ensembles/<name>.json             fitted ensembles (``fer_ray.ensemble``)
    pareto.csv          budget-search candidates;  distilled.parquet: students (``fer-ray distill``)
    budget.json         ``--time-limit``: the calibration, the plan, what the budget cut, each stage's time
    distill/<name>/     a student's run: the same tune/, train/, trials/ layout, plus teacher_train.parquet
    report/             leaderboard.csv, leaderboard.md, report.html
    footprint/<trial_id>/<run_id>.json   what a running Train run holds on the cluster (``fer_ray.footprint``)
    .fer_ray.lease      the writing command's lease: host, pid, heartbeat (``fer_ray.lease``)

Each checkpoint folder holds one ``epoch_NNN.pt`` and its sha256 ``manifest.json`` (``fer_ray.checkpoint``); Ray's
``CheckpointConfig`` keeps each trial's best epoch (by ``val_acc``) and its latest. A *group* is the prefix of a
set of runs: ``""`` for the sweep's trials, ``distill/<name>`` for a student.
"""

from __future__ import annotations

import io
import posixpath
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from fer_ray.checkpoint import EPOCH_RE
from fer_ray.config import ConfigError, SweepConfig, parse_sweep
from fer_ray.storage import Storage, join_uri, normalize, split_uri

SWEEP, ROLES, DATA = "sweep.yaml", "split_roles.json", "data.json"
TRIALS, DISTILLED, PARETO, LIBRARY = "trials.parquet", "distilled.parquet", "pareto.csv", "library.parquet"
BUDGET = "budget.json"
TUNE, TRAIN, REPORT, LOGITS, ENSEMBLES = "tune", "train", "report", "logits", "ensembles"
HISTORY, METRICS = "history.json", "metrics.parquet"
MARKER = ".fer_ray"
"""Written into every folder fer_ray creates (an experiment, a student's run); fer_ray deletes or overwrites only
folders that hold it."""
_STORE_RE = re.compile(r"^logits/([^/]+)/([^/]+)\.parquet$")


def _join(*parts: str) -> str:
    return posixpath.join(*[p for p in parts if p])


class Experiment(Storage):
    """The results of one experiment at ``location`` (see the module docstring for the layout)."""

    @classmethod
    def under(cls, out: str, name: str) -> Experiment:
        """The experiment ``name`` under the results root ``out`` (a path or URI)."""
        return cls(join_uri(normalize(out), name))

    # -- ownership -------------------------------------------------------------------------------------------
    def mark_created(self, rel: str = "") -> None:
        """Record that fer_ray created the folder ``rel`` (the experiment itself by default)."""
        if not self.is_file(_join(rel, MARKER)):
            from fer_ray import __version__

            self.write_json(_join(rel, MARKER), {"created_by": "fer_ray", "version": __version__})

    def owns(self, rel: str = "") -> bool:
        return self.is_file(_join(rel, MARKER))

    def remove(self, rel: str = "", within: str | None = None) -> None:
        """Delete the folder ``rel`` that fer_ray created; anything else is refused with ``ConfigError``. On a local
        disk the folder must not be a symlink and must lie inside ``within`` (a results root) when given."""
        where = self.uri_of(rel)
        if not self.exists(rel):
            return
        if self.is_local:
            path = Path(self.path(rel))
            if path.is_symlink():
                raise ConfigError(f"{where} is a symlink: fer_ray deletes only folders it created, never a link")
            if within and not path.resolve().is_relative_to(Path(normalize(within)).resolve()):
                raise ConfigError(f"{where} resolves to {path.resolve()}, outside the results root {within}: "
                                  "refusing to delete it")
        if not self.owns(rel):
            raise ConfigError(f"{where} was not created by fer_ray (no {MARKER} marker in it): refusing to delete "
                              "or overwrite it; choose another --name/--out or remove it yourself")
        self.delete(rel)

    # -- set-up files ----------------------------------------------------------------------------------------
    def require(self, rel: str, hint: str = "") -> None:
        if not self.is_file(rel):
            raise ConfigError(f"{self.uri}: no {rel} here{hint or ' (not a fer_ray experiment folder?)'}")

    def sweep(self) -> SweepConfig:
        self.require(SWEEP)
        return parse_sweep(self.read_text(SWEEP), self.uri_of(SWEEP), default_name=self.name)

    def write_sweep(self, cfg: SweepConfig) -> None:
        import yaml

        self.write_text(SWEEP, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def roles(self) -> dict[str, str]:
        self.require(ROLES)
        return self.read_json(ROLES)

    def write_roles(self, roles: dict[str, str]) -> None:
        self.write_json(ROLES, roles)

    def select_split(self) -> str:
        return next(s for s, r in self.roles().items() if r == "select")

    def check_data(self, found: dict[str, str], source: str) -> None:
        """Stop with one line if ``found`` (``fer_ray.data.dataset.fingerprint`` of the data just read from
        ``source``) is not the fingerprint recorded when the experiment started (experiments from before the
        fingerprint existed are not checked)."""
        recorded = self.data_info().get("fingerprint")
        if recorded and recorded != found:
            raise ConfigError(f"{self.uri}: the data read from {source} is not the data this experiment trained on "
                              f"(fingerprint data {found['data']} splits {found['splits']}; recorded data "
                              f"{recorded['data']} splits {recorded['splits']}): was the source moved, changed or "
                              "split differently, or is this the wrong working folder?")

    def data_info(self) -> dict:
        return self.read_json(DATA) if self.is_file(DATA) else {}

    def write_data_info(self, info: dict) -> None:
        self.write_json(DATA, info)

    # -- trial runs ------------------------------------------------------------------------------------------
    def tune_storage(self, group: str = "") -> str:
        """``storage_path`` of the group's Ray Tune run (named ``tune``)."""
        return self.uri_of(group)

    def train_storage(self, group: str = "") -> str:
        """``storage_path`` of the group's Ray Train runs (one per DDP trial, named ``train_<trial_id>``)."""
        return self.uri_of(_join(group, TRAIN))

    def trial_ids(self, group: str = "") -> list[str]:
        """Trials that finished at least one epoch (they have a history)."""
        base = _join(group, "trials")
        return [t for t in self.dirs(base) if self.is_file(_join(base, t, HISTORY))]

    def history(self, trial_id: str, group: str = "") -> list[dict]:
        return self.read_json(_join(group, "trials", trial_id, HISTORY))

    def write_history(self, trial_id: str, history: list[dict], group: str = "") -> None:
        self.write_json(_join(group, "trials", trial_id, HISTORY), history)

    def write_metrics(self, trial_id: str, df: pd.DataFrame, group: str = "") -> None:
        self.write_with(_join(group, "trials", trial_id, METRICS), lambda f: df.to_parquet(f, index=False))

    def metrics(self, trial_id: str, group: str = "") -> pd.DataFrame | None:
        rel = _join(group, "trials", trial_id, METRICS)
        return self.read_parquet(rel) if self.is_file(rel) else None

    def marker(self, trial_id: str, name: str, group: str = "") -> str:
        """A per-trial marker file's path (used by the fault-injection test hook)."""
        return _join(group, "trials", trial_id, name)

    def checkpoints(self, trial_id: str, group: str = "") -> dict[int, str]:
        """Epoch → location of every checkpoint Ray kept for ``trial_id`` (Train run or Tune trial folder)."""
        out = {}
        for base in (_join(group, TUNE, trial_id), _join(group, TRAIN, f"train_{trial_id}")):
            for rel in self.files(base, recursive=True):
                m = EPOCH_RE.fullmatch(posixpath.basename(rel))
                if m:
                    out[int(m.group(1))] = self.uri_of(rel)
        return dict(sorted(out.items()))

    # -- tables ----------------------------------------------------------------------------------------------
    def read_parquet(self, rel: str) -> pd.DataFrame:
        return self.call(lambda: pq.read_table(self.path(rel), filesystem=self.fs)).to_pandas()

    def write_parquet(self, rel: str, df: pd.DataFrame) -> str:
        return self.write_with(rel, lambda f: df.to_parquet(f, index=False))

    def trials(self) -> pd.DataFrame:
        self.require(TRIALS, " (run the sweep first)")
        return self.read_parquet(TRIALS)

    def write_trials(self, df: pd.DataFrame) -> None:
        self.write_parquet(TRIALS, df)

    def library(self) -> pd.DataFrame | None:
        return self.read_parquet(LIBRARY) if self.is_file(LIBRARY) else None

    def write_library(self, df: pd.DataFrame) -> None:
        self.write_parquet(LIBRARY, df)

    def members(self) -> pd.DataFrame:
        """Every scoreable member, indexed by member id (column ``trial_id``): the sweep's trials (``kind`` model),
        the checkpoint library (``snapshot`` for a kept epoch, ``ema`` for EMA weights) and distilled students
        (``distill``). Column ``weights`` says which weights of the checkpoint it is (``raw`` or ``ema``)."""
        parts = [self.trials().assign(kind="model", weights="raw")]
        for extra in (self.library(), self.distilled()):
            if extra is not None and len(extra):
                parts.append(extra if "kind" in extra else extra.assign(kind="distill"))
        df = pd.concat(parts, ignore_index=True)
        df["weights"] = df["weights"].fillna("raw")
        return df.set_index("trial_id")

    def delete_checkpoint(self, location: str) -> None:
        """Remove the checkpoint folder holding the file at ``location`` (a pruned library epoch)."""
        base = split_uri(location)[0] if not self.is_local else location
        root = split_uri(self.uri)[0] if not self.is_local else self.root
        rel = posixpath.relpath(posixpath.dirname(base), root)
        if rel.startswith(".."):
            raise ConfigError(f"{location} is not inside {self.uri}")
        self.delete(rel)

    def distilled(self) -> pd.DataFrame | None:
        return self.read_parquet(DISTILLED) if self.is_file(DISTILLED) else None

    def write_distilled(self, df: pd.DataFrame) -> None:
        self.write_parquet(DISTILLED, df)

    def pareto(self) -> pd.DataFrame | None:
        return pd.read_csv(io.BytesIO(self.read_bytes(PARETO))) if self.is_file(PARETO) else None

    def write_pareto(self, df: pd.DataFrame) -> str:
        return self.write_text(PARETO, df.to_csv(index=False))

    def budget(self) -> dict | None:
        """``budget.json`` (``fer_ray.budget``) of a run with a time limit, else ``None``."""
        return self.read_json(BUDGET) if self.is_file(BUDGET) else None

    def write_budget(self, info: dict) -> None:
        self.write_json(BUDGET, info)

    # -- logit store -----------------------------------------------------------------------------------------
    def logits_rel(self, member: str, split: str) -> str:
        return _join(LOGITS, member, f"{split}.parquet")

    def has_logits(self, member: str, split: str | None = None) -> bool:
        if split is None:
            return bool(self.files(_join(LOGITS, member)))
        return self.is_file(self.logits_rel(member, split))

    def store_entries(self, splits: list[str] | None = None) -> list[tuple[str, str]]:
        """``(member, split)`` of every stored logit file, sorted; only ``splits`` when given."""
        out = []
        for rel in self.files(LOGITS, recursive=True):
            m = _STORE_RE.match(rel)
            if m and (splits is None or m.group(2) in splits):
                out.append((m.group(1), m.group(2)))
        return out

    # -- ensembles -------------------------------------------------------------------------------------------
    def ensemble_names(self) -> list[str]:
        return [posixpath.basename(r)[:-5] for r in self.files(ENSEMBLES) if r.endswith(".json")]

    def ensemble(self, name: str) -> dict:
        rel = _join(ENSEMBLES, f"{name}.json")
        if not self.is_file(rel):
            have = ", ".join(self.ensemble_names()) or "none"
            raise ConfigError(f"ensemble {name!r}: no {self.uri_of(rel)} (ensembles here: {have})")
        return self.read_json(rel)

    def write_ensemble(self, info: dict) -> None:
        self.write_json(_join(ENSEMBLES, f"{info['name']}.json"), info)

    # -- report ----------------------------------------------------------------------------------------------
    def report_storage(self, out: str | None = None) -> Storage:
        """Where the report goes: ``out`` (a path or URI) or ``<experiment>/report``."""
        return Storage(out) if out else self.child(REPORT)


def as_experiment(location: Experiment | str | Path) -> Experiment:
    """``location`` as an ``Experiment`` (paths and URIs are opened; an ``Experiment`` is returned as it is)."""
    return location if isinstance(location, Experiment) else Experiment(location)
