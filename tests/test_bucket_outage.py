"""A bucket outage mid-sweep, end to end: ``fer-ray sweep`` (joined to the session's Ray, as a job would) writes its
experiment to moto's S3 server through ``fer_ray.testing.flaky_proxy``; once the first epoch's ``history.json``
has landed, the proxy refuses every connection for a while (12 s here, 30 s with ``FER_RAY_LONG=1``) and then
accepts again. The sweep finishes with every trial, epoch and checkpoint present and the same leaderboard as the
same sweep run straight into the bucket. With ``FER_RAY_LONG=1`` also: an outage longer than
``FER_RAY_STORAGE_RETRY_S`` (forwarded to the trials by ``fer_ray.cluster``) stops the sweep with one line naming
the bucket, and ``--resume`` finishes it afterwards.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fer_ray.checkpoint import load_checkpoint
from fer_ray.cli import main
from fer_ray.experiment import Experiment
from fer_ray.storage import join_uri
from fer_ray.testing import flaky_proxy

pytestmark = [pytest.mark.ray, pytest.mark.subprocess]
REPO = Path(__file__).resolve().parent.parent
LONG = os.environ.get("FER_RAY_LONG") == "1"
OUTAGE_S = 30.0 if LONG else 12.0

SWEEP = """
name: {name}
data: {{synthetic_n: 240, val_fraction: 0.25, cache_dir: {cache}}}
train: {{model: basic_cnn, img_size: 32, epochs: 3, batch_size: 32, num_workers: 0, cpus_per_worker: 1}}
search_space: {{lr: {{grid: [0.001, 0.003]}}}}
num_samples: 1
asha: {{max_t: 3, grace_period: 3}}
"""


def _sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "fer_ray.cli", "sweep", *args, "--sweep-only"]


def _write_cfg(tmp_path: Path, name: str) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(SWEEP.format(name=name, cache=tmp_path / "cache"))
    return cfg


def _board(exp: Experiment) -> list:
    """The leaderboard as the sweep left it: per trial (by its lr) best val acc, best epoch, epochs, last val loss."""
    t = exp.trials()
    lr = [json.loads(c)["lr"] for c in t.config]
    val_loss = [exp.history(tid)[-1]["val_loss"] for tid in t.trial_id]
    return sorted(zip(lr, t.best_val_acc, t.best_epoch, t.epochs_run, val_loss, strict=True))


def _check_complete(exp: Experiment) -> None:
    """Every trial ran every epoch, its history is 1..3 in order, and each kept checkpoint loads (sha256-checked)."""
    trials = exp.trials()
    assert len(trials) == 2 and (trials.epochs_run == 3).all(), trials
    for tid in trials.trial_id:
        assert [h["epoch"] for h in exp.history(tid)] == [1, 2, 3]
        kept = exp.checkpoints(tid)
        assert 3 in kept and all(load_checkpoint(loc)["epoch"] == e for e, loc in kept.items())


def _refuse_after_first_history(proxy, exp: Experiment, outage_s: float | None,
                                deadline_s: float = 300) -> threading.Thread:
    """A thread that polls the bucket directly (not through the proxy) and, once any trial's first epoch has landed,
    refuses connections for ``outage_s`` (``None``: until the test calls ``proxy.accept()``)."""
    def run():
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and not exp.trial_ids():
            time.sleep(0.2)
        proxy.refuse()
        if outage_s is not None:
            time.sleep(outage_s)
            proxy.accept()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _run(cmd: list[str], env: dict, log: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    with open(log, "w") as err:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                              timeout=timeout)


def test_sweep_survives_a_bucket_outage(s3_server, session_env, tmp_path):
    env = session_env | {"PYTHONPATH": str(REPO)}
    with flaky_proxy(s3_server) as proxy:
        via_proxy = proxy.uri(s3_server)
        exp = Experiment.under(s3_server, "outage")  # the same objects, read without the proxy
        refuser = _refuse_after_first_history(proxy, exp, OUTAGE_S)
        out = _run(_sweep(str(_write_cfg(tmp_path, "outage")), "--out", via_proxy), env, tmp_path / "outage.log")
        refuser.join(timeout=5)
        log = (tmp_path / "outage.log").read_text()
        assert out.returncode == 0, log[-3000:]
        assert proxy.refusals == 1
    _check_complete(exp)
    bucket = f"bucket s3://fer-test (endpoint 127.0.0.1:{proxy.port})"
    seen = log.count(f"{bucket} unreachable, retrying for up to 120 s")  # the driver's own line (the lease)
    assert seen <= 1 and log.count(f"{bucket} reachable again after") == seen, log[-3000:]  # one per outage
    straight = Experiment.under(s3_server, "straight")  # the reference run, in this process (joined to the same Ray)
    assert main(["sweep", str(_write_cfg(tmp_path, "straight")), "--out", s3_server, "--sweep-only"]) == 0
    assert _board(exp) == _board(straight)


@pytest.mark.skipif(not LONG, reason="long variant (FER_RAY_LONG=1): the sweep waits out each trial's retries; the "
                    "suite checks the limit at the storage level (tests/test_storage_outage.py)")
def test_outage_past_the_limit_stops_with_one_line_then_resume_finishes(s3_server, session_env, tmp_path):
    """The bucket stays away until the sweep has given up: its trials fail (Tune's retry too), and the driver's
    last stage stops with one line naming the bucket; once it is back, ``--resume`` runs the trials again from
    their last checkpoints to the end."""
    env = session_env | {"PYTHONPATH": str(REPO), "FER_RAY_STORAGE_RETRY_S": "4"}
    with flaky_proxy(s3_server) as proxy:
        via_proxy = proxy.uri(s3_server)
        exp = Experiment.under(s3_server, "limit")
        refuser = _refuse_after_first_history(proxy, exp, None)
        out = _run(_sweep(str(_write_cfg(tmp_path, "limit")), "--out", via_proxy), env, tmp_path / "limit.log")
        refuser.join(timeout=5)
        proxy.accept()
        log = (tmp_path / "limit.log").read_text()
        assert out.returncode == 2, log[-3000:]
        bucket = f"bucket s3://fer-test (endpoint 127.0.0.1:{proxy.port}) unreachable for"
        last = log.strip().splitlines()[-1]
        assert last.startswith(f"fer-ray: error: {bucket}") and "past the 4 s limit" in last, log[-3000:]
        assert f"StorageUnavailable: {bucket}" in log  # the trial's own error, in Tune's report of its failure
        resumed = _run(_sweep("--resume", join_uri(via_proxy, "limit")), env, tmp_path / "resume.log")
        assert resumed.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    _check_complete(exp)
