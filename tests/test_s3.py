"""Every artifact through storage: an experiment in an S3 bucket (moto's real S3 server on 127.0.0.1).

The fast test drives ``Experiment``/``Storage``, checkpoints and the logit store against the bucket. The slow one
runs the CLI as a user would with ``--out s3://...?endpoint_override=...``: a sweep (one in-process trial, one DDP
trial; ``--sweep-only``) interrupted with SIGINT, ``--resume``d to the end (TTA, ensembles, report), then ``ensemble``,
``report`` and ``evaluate`` on the bucket (through ``fer_ray.cli.main`` in the test's process); it lists the bucket
against the layout and checks that no checkpoint was written to the local disk.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch

from fer_ray.checkpoint import CheckpointError, checkpoint_sha256, load_checkpoint, make_payload, write_checkpoint
from fer_ray.cli import main
from fer_ray.data.synthetic import generate, write_csv
from fer_ray.experiment import Experiment
from fer_ray.models import create_model
from fer_ray.storage import Storage, join_uri
from fer_ray.store import read_logits, write_logits
from fer_ray.testing import reap

REPO = Path(__file__).resolve().parent.parent


def test_storage_and_store_on_s3(s3_server, tmp_path):
    exp = Experiment.under(s3_server, "unit")
    assert exp.uri.startswith("s3://fer-test/runs/unit?") and not exp.is_local
    exp.write_json("split_roles.json", {"val": "select"})
    assert exp.roles() == {"val": "select"} and exp.select_split() == "val"
    logits = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
    write_logits(exp, "m", "val", logits, np.arange(5) % 7, np.array(list("abcde")), ["identity", "hflip"], {"k": 1})
    back = read_logits(exp, "m", "val")
    assert np.array_equal(back.logits, logits) and back.meta == {"k": 1}
    assert exp.store_entries() == [("m", "val")]
    # A checkpoint folder uploaded to the bucket is read (and verified) by its URI.
    model = create_model("basic_cnn", img_size=32)
    folder = write_checkpoint(tmp_path / "ck", make_payload(model, 3, {}, {"val_acc": 0.5})).parent
    for f in folder.iterdir():
        exp.write_bytes(f"trials/x/ck/{f.name}", f.read_bytes())
    location = exp.uri_of("trials/x/ck/epoch_003.pt")
    assert location.startswith("s3://fer-test/runs/unit/trials/x/ck/epoch_003.pt?")
    ckpt = load_checkpoint(location)
    assert ckpt["epoch"] == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt["state_dict"].items())
    assert len(checkpoint_sha256(location)) == 64
    exp.write_bytes("trials/x/ck/epoch_003.pt", b"tampered")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(location)
    assert Storage(join_uri(s3_server, "unit", "trials")).dirs() == ["x"]


SWEEP = """
name: s3exp
data: {{synthetic_n: 400, val_fraction: 0.2, cache_dir: {cache}}}
train: {{model: basic_cnn, img_size: 32, epochs: 3, batch_size: 32, cpus_per_worker: 0.9}}
search_space: {{num_workers: {{grid: [0, 2]}}}}
num_samples: 1
asha: {{max_t: 3, grace_period: 3}}
ensemble_top_k: 2
tta_views: [identity, hflip, "shift1,0"]
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fer_ray.cli", *args]


def _bucket_files(uri: str) -> list[str]:
    storage = Storage(uri)
    return storage.files(recursive=True)


@pytest.mark.ray
@pytest.mark.subprocess
def test_sweep_resume_ensemble_report_evaluate_on_s3(s3_server, tmp_path, session_env, monkeypatch, capsys):
    work = tmp_path / "work"  # the subprocesses' working folder: it must get no checkpoint
    work.mkdir()
    cfg = tmp_path / "s3exp.yaml"
    cfg.write_text(SWEEP.format(cache=tmp_path / "cache"))
    env = session_env | {"PYTHONPATH": str(REPO)}  # every command joins the session's Ray, as a job would
    exp = Experiment.under(s3_server, "s3exp")

    def run(*args: str, timeout: int = 300) -> str:
        with open(tmp_path / "cli.log", "a") as log:
            out = subprocess.run(_cli(*args), cwd=work, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                 timeout=timeout)
        assert out.returncode == 0, (tmp_path / "cli.log").read_text()[-3000:]
        return out.stdout

    def epochs_done() -> dict[str, int]:
        while True:  # a poll may read a history.json while a trial overwrites it (size and body from two versions)
            try:
                return {t: len(exp.history(t)) for t in exp.trial_ids()}
            except ValueError:
                time.sleep(0.1)

    # --sweep-only: an interrupted driver would go on to TTA, ensembles and a report of what had finished, all of
    # which the resume does again (18 s of this test, measured 2026-12-07, that prove nothing the resume does not).
    proc = subprocess.Popen(_cli("sweep", str(cfg), "--out", s3_server, "--sweep-only"), cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (3 in epochs_done().values() and len(epochs_done()) == 2):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the in-process trial finished, the DDP trial has started
        proc.wait(timeout=120)
    finally:
        reap(proc)
    done = epochs_done()
    finished = [t for t, n in done.items() if n == 3]
    assert finished and len(done) == 2, done
    before = {t: {loc: exp.fs.get_file_info(Storage(loc).root).mtime for loc in exp.checkpoints(t).values()}
              for t in finished}

    run("sweep", "--resume", exp.uri, timeout=400)
    trials = exp.trials().set_index("trial_id")
    assert len(trials) == 2 and (trials.epochs_run == 3).all()
    assert all(c.startswith("s3://fer-test/runs/s3exp/") for c in trials.checkpoint)
    for t, mtimes in before.items():  # finished before the interrupt: not re-run by the resume
        assert {loc: exp.fs.get_file_info(Storage(loc).root).mtime for loc in exp.checkpoints(t).values()} == mtimes

    files = _bucket_files(exp.uri)
    ddp = next(t for t in trials.index if trials.loc[t, "config"].count('"num_workers": 2'))
    local = next(t for t in trials.index if t != ddp)
    for rel in ("sweep.yaml", "split_roles.json", "data.json", "trials.parquet", "report/leaderboard.csv",
                "report/report.html", "ensembles/top2_mean_logits.json", "ensembles/greedy_nll.json",
                f"trials/{ddp}/history.json", f"trials/{local}/metrics.parquet",
                f"train/train_{ddp}/checkpoint_manager_snapshot.json", f"logits/{ddp}/public_test.parquet"):
        assert rel in files, rel
    assert any(f.startswith(f"train/train_{ddp}/epoch_") and f.endswith(".pt") for f in files)  # Ray Train's
    assert any(f.startswith(f"tune/{local}/checkpoint_") and f.endswith(".pt") for f in files)  # Ray Tune's
    assert any(f.startswith("tune/experiment_state") for f in files)
    for t in trials.index:  # CheckpointConfig: the best epoch and the latest, nothing else
        assert set(exp.checkpoints(t)) == {int(trials.loc[t, "best_epoch"]), 3}

    # The follow-up commands in this process (joined to the same Ray), from the same working folder: the sweep's
    # two drivers above are the processes a user starts; three more interpreter start-ups would prove nothing new.
    monkeypatch.chdir(work)
    assert read_logits(exp, ddp, "val").views == ["identity", "hflip", "shift1,0"]  # the resume's TTA stage
    assert main(["ensemble", exp.uri, "--top-k", "2", "--combiner", "nll_weights"]) == 0
    assert main(["report", exp.uri]) == 0
    ext = write_csv(tmp_path / "other.csv", generate(70, seed=5))
    capsys.readouterr()
    assert main(["evaluate", exp.uri, "--data", str(ext)]) == 0
    assert "acc_ext_other" in capsys.readouterr().out
    board = pd.read_csv(exp.fs.open_input_stream(exp.path("report/leaderboard.csv")))
    assert {"top2_nll_weights", "top2_mean_logits", "greedy_nll", ddp, local} <= set(board.name)
    assert board["acc_ext_other"].notna().all() and exp.roles()["ext_other"] == "report"
    assert not [p for p in tmp_path.rglob("*.pt")], "a checkpoint was written to the local disk"
    assert not list(work.rglob("manifest.json"))
    assert isinstance(exp.fs, pafs.S3FileSystem)
