"""Faults lose no finished work: a worker killed mid-run resumes from its last epoch checkpoint (Ray Train
FailureConfig, ``ray.train.get_checkpoint``), and an interrupted sweep driver (SIGINT), then a lost one (SIGKILL: its
lease left behind, taken over at once as its pid is dead), resume (Tune's restore) without re-running finished
trials, ending with the same leaderboard as an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fer_ray.cli import main
from fer_ray.cluster import put_dataset
from fer_ray.config import TrainConfig
from fer_ray.data import FERData, split_indices
from fer_ray.data.synthetic import generate
from fer_ray.experiment import Experiment
from fer_ray.lease import LEASE
from fer_ray.testing import reap
from fer_ray.train import make_trainer

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_session):
    data: FERData = generate(300, seed=1)
    ref = put_dataset(data, split_indices(data, 0.2, 0))
    cfg = TrainConfig(model="basic_cnn", img_size=32, epochs=3, batch_size=32, num_workers=2, cpus_per_worker=0.9)
    trainer = make_trainer(cfg, ref, tmp_path, "faulty", max_failures=1)
    trainer.train_loop_config["fail_after_epoch"] = 2
    trainer.fit()
    marker = tmp_path / "trials" / "faulty" / ".failed_after_2"
    assert marker.exists(), "the worker was killed after epoch 2"
    history = json.loads((tmp_path / "trials" / "faulty" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    killed_at = marker.stat().st_mtime
    assert history[1]["finished_at"] < killed_at < history[2]["finished_at"], "epoch 2 was re-run after the kill"
    kept = Experiment(tmp_path).checkpoints("faulty")
    best = max(history, key=lambda h: (h["val_acc"], h["epoch"]))["epoch"]
    assert set(kept) == {best, 3}, f"Ray keeps the best (val_acc) and the latest checkpoint, kept {sorted(kept)}"


def _trial_pids(exp_dir: Path) -> dict[str, set[int]]:
    """The processes each Tune trial reported from: the ``pid`` Tune adds to every result (its ``result.json``)."""
    return {f.parent.name: {json.loads(line)["pid"] for line in f.read_text().splitlines() if line.strip()}
            for f in (exp_dir / "tune").glob("*/result.json")}


def _sweep_cmd(*args):
    return [sys.executable, "-m", "fer_ray.cli", "sweep", *args, "--sweep-only"]


def _kill_when(proc: subprocess.Popen, ready, sig: int, timeout_s: float = 240) -> None:
    """Send ``sig`` to ``proc`` once ``ready()`` holds (or at the liveness deadline), and wait for it to end."""
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and not ready():
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        reap(proc)


@pytest.mark.subprocess
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, session_env):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
name: resume
data: {{synthetic_n: 300, val_fraction: 0.2, cache_dir: {tmp_path / 'cache'}}}
train: {{model: basic_cnn, img_size: 32, epochs: 4, batch_size: 32, num_workers: 0, cpus_per_worker: 1}}
search_space: {{lr: {{grid: [0.001, 0.002, 0.003]}}}}
num_samples: 1
asha: {{max_t: 4, grace_period: 4}}
""")
    env = session_env  # each driver joins the session's Ray, as `ray job submit` would
    exp = tmp_path / "out" / "resume"
    proc = subprocess.Popen(_sweep_cmd(str(cfg), "--out", str(tmp_path / "out")), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def epochs_done() -> list[int]:
        return [len(json.loads(p.read_text())) for p in (exp / "trials").glob("*/history.json")]

    def interrupted_mid_trial() -> bool:  # one trial finished, another one part-way
        done = epochs_done()
        return 4 in done and any(1 <= d <= 2 for d in done)

    _kill_when(proc, interrupted_mid_trial, signal.SIGINT)
    assert interrupted_mid_trial(), epochs_done()
    assert not (exp / LEASE).exists(), "an interrupted driver releases its lease"
    store = Experiment(exp)

    def checkpoint_mtimes(trial_id: str) -> dict:
        return {loc: Path(loc).stat().st_mtime_ns for loc in store.checkpoints(trial_id).values()}

    first = {t: checkpoint_mtimes(t) for t in store.trial_ids() if len(store.history(t)) == 4}
    assert first, "at least one trial finished before the interrupt"
    # The lost driver: the resumed one is killed outright once it has persisted an epoch of its own.
    done, at_kill = sum(epochs_done()), []
    proc = subprocess.Popen(_sweep_cmd("--resume", str(exp)), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: at_kill.append(sum(epochs_done())) or at_kill[-1] > done, signal.SIGKILL)
    assert done < at_kill[-1] < 12, (done, at_kill[-1])  # killed mid-sweep, after an epoch of its own
    assert (exp / LEASE).exists(), "SIGKILL leaves the dead driver's lease behind"
    resumed = subprocess.run(_sweep_cmd("--resume", str(exp)), cwd=REPO, env=env, timeout=300,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over the stale lease" in resumed.stderr and f"pid {proc.pid} is not running" in resumed.stderr
    assert not (exp / LEASE).exists()
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 3 and (trials.epochs_run == 4).all()
    for trial_id, mtimes in first.items():  # finished before the interrupt: untouched by the resume
        assert checkpoint_mtimes(trial_id) == mtimes
    # The same sweep run without interruption ends with the same leaderboard, to the last digit (in this process,
    # joined to the same Ray: the drivers above are the ones whose faults are under test).
    # Its three in-process trials run one after another in fewer processes than trials (``reuse_actors``).
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "straight"), "--sweep-only"]) == 0
    pids = _trial_pids(tmp_path / "straight" / "resume")
    assert len(pids) == 3 and 1 <= len(set().union(*pids.values())) < 3, pids
    straight = pd.read_parquet(tmp_path / "straight" / "resume" / "trials.parquet")

    def board(t: pd.DataFrame, root: Path) -> list:
        lr = [json.loads(c)["lr"] for c in t.config]
        val_loss = [Experiment(root).history(tid)[-1]["val_loss"] for tid in t.trial_id]
        return sorted(zip(t.best_val_acc, lr, t.best_epoch, t.epochs_run, val_loss, strict=True), reverse=True)

    assert board(trials, exp) == board(straight, tmp_path / "straight" / "resume")
