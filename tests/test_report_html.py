"""The HTML report's leaderboard fits the page: the key columns in the first table, every other column in a second
table behind a ``<details>`` toggle. Built from planted logits (no training, no Ray); the headless-browser check of
the same layout is ``scripts/screenshot_report.py``."""

import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from fer_ray.ensemble import EnsembleSpec, run_ensemble
from fer_ray.report import key_columns, leaderboard, write_report
from fer_ray.store import write_logits

ROLES = {"train": "fit", "val": "select", "public_test": "report", "private_test": "report"}
KEY = ["name", "kind", "arch", "img_size", "tta_views", "total_gmacs", "oof_acc_val", "acc_val", "acc_public_test",
       "macro_f1_public_test"]
VIEWS = ["identity", "hflip"]


class _Tables(HTMLParser):
    """Each ``<table>``'s id, header cells and whether it sits inside a ``<details>`` (and which one)."""

    def __init__(self):
        super().__init__()
        self.tables, self.details, self._th = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self.details.append(attrs.get("id"))
        elif tag == "table":
            self.tables.append({"id": attrs.get("id"), "in": self.details[-1] if self.details else None,
                                "columns": []})
        elif tag == "th":
            self._th = True

    def handle_endtag(self, tag):
        if tag == "details":
            self.details.pop()
        elif tag == "th":
            self._th = False

    def handle_data(self, data):
        if self._th and self.tables and data.strip():
            self.tables[-1]["columns"].append(data.strip())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three basic_cnn/deep_cnn_v1 trials of known strength on val, public_test and private_test, and two
    ensembles: a wide leaderboard (every split's metrics, members, combiners) like a real experiment's."""
    root = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    (root / "split_roles.json").write_text(json.dumps(ROLES))
    labels = {s: rng.integers(0, 7, 210) for s in ("val", "public_test", "private_test")}
    rows = []
    for i, (arch, strength) in enumerate([("basic_cnn", 0.8), ("deep_cnn_v1", 1.6), ("baseline_cnn_v1", 2.4)]):
        tid = f"a4646_0000{i}"
        for split, y in labels.items():
            x = rng.normal(0, 1, (len(VIEWS), len(y), 7)).astype(np.float32)
            x[:, np.arange(len(y)), y] += strength
            write_logits(root, tid, split, x, y, np.array([f"{split}{j}" for j in range(len(y))]), VIEWS,
                         {"member": tid, "split": split, "role": ROLES[split], "views": VIEWS,
                          "checkpoint_sha256": f"sha-{tid}"})
        rows.append({"trial_id": tid, "arch": arch, "img_size": 40 + 4 * i, "in_chans": 1, "params": 1_000_000 + i,
                     "gmacs": 0.1 * (i + 1), "best_val_acc": 0.3 + 0.2 * i, "best_epoch": 1, "epochs_run": 1,
                     "stopped_early": False, "checkpoint": "x", "config": "{}"})
    pd.DataFrame(rows).to_parquet(root / "trials.parquet")
    run_ensemble(root, EnsembleSpec(name="top3_mean_logits", members={"top_k": 3}, oof_folds=0))
    run_ensemble(root, EnsembleSpec.from_dict({"name": "greedy_nll", "members": {"top_k": 3}, "combiner": "greedy",
                                               "temperature": True, "oof_folds": 3}))
    return root


def test_key_columns_come_first_and_the_rest_sit_behind_the_toggle(planted):
    board = leaderboard(planted)
    assert key_columns(board, ROLES) == KEY
    html = write_report(planted, planted / "report", board=board)["html"]
    parsed = _Tables()
    parsed.feed(open(html, encoding="utf-8").read())
    first, *others = parsed.tables
    assert first == {"id": "leaderboard", "in": None, "columns": KEY}, "the first table is not the key columns"
    assert [t["id"] for t in others] == ["leaderboard-rest"] and others[0]["in"] == "all-columns"
    rest = others[0]["columns"]
    assert rest[0] == "name" and set(rest[1:]) == set(board.columns) - set(KEY)
    assert {"members", "params", "nll_public_test", "acc_private_test", "efficiency"} <= set(rest)
    assert len(rest) - 1 + len(KEY) == len(board.columns), "a column is missing or shown twice"
