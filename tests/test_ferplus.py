"""FER+ majority-vote relabelling on top of a generated fer2013.csv: mapping, drops, and mismatch errors."""

import numpy as np
import pandas as pd
import pytest

from fer_ray.config import DataConfig
from fer_ray.data import CLASSES, DataError, load_data
from fer_ray.data.ferplus import VOTE_COLUMNS, apply_ferplus, majority_labels
from fer_ray.data.ingest import load_dataset
from fer_ray.data.synthetic import generate, write_csv

USAGE_NAMES = ["Training", "PublicTest", "PrivateTest"]


def _votes(top: list[str], usage: list[str]) -> pd.DataFrame:
    rows = []
    for i, (t, u) in enumerate(zip(top, usage, strict=True)):
        v = dict.fromkeys(VOTE_COLUMNS, 0)
        if t == "tie":
            v["happiness"] = v["sadness"] = 5
        else:
            v[t], v["neutral" if t != "neutral" else "fear"] = 7, 3
        rows.append({"Usage": u, "Image name": f"fer{i:07d}.png", **v})
    return pd.DataFrame(rows, columns=["Usage", "Image name", *VOTE_COLUMNS])


@pytest.fixture
def source(tmp_path):
    data = generate(60, seed=2)
    csv = write_csv(tmp_path / "fer2013.csv", data)
    cycle = ["anger", "happiness", "contempt", "NF", "tie", "surprise", "unknown", "neutral", "fear", "sadness"]
    top = [cycle[i % len(cycle)] for i in range(len(data))]
    path = tmp_path / "fer2013new.csv"
    _votes(top, [USAGE_NAMES[u] for u in data.usage]).to_csv(path, index=False)
    return csv, path, top


def test_majority_vote_mapping_and_drops(source, tmp_path):
    csv, path, top = source
    data = load_dataset(csv, cache_dir=None)
    out, info = apply_ferplus(data, path)
    want = {"anger": "angry", "happiness": "happy", "surprise": "surprise", "neutral": "neutral", "fear": "fear",
            "sadness": "sad"}
    kept = [i for i, t in enumerate(top) if t in want]
    assert info == {"rows": 60, "kept": len(kept), "dropped": 60 - len(kept),
                    "changed": int(sum(CLASSES.index(want[top[i]]) != data.labels[i] for i in kept))}
    assert [CLASSES[c] for c in out.labels] == [want[top[i]] for i in kept]
    assert np.array_equal(out.images, data.images[kept]) and np.array_equal(out.usage, data.usage[kept])
    # Through the config, as a sweep would use it.
    cfg = DataConfig(path=str(csv), ferplus=str(path), cache_dir=str(tmp_path / "c"))
    assert np.array_equal(load_data(cfg).labels, out.labels)


def test_ties_and_non_faces_are_dropped():
    v = _votes(["tie", "NF", "contempt", "happiness"], ["Training"] * 4)
    assert majority_labels(v).tolist() == [-1, -1, -1, CLASSES.index("happy")]


def test_mismatched_files_are_refused(source, tmp_path):
    csv, path, _ = source
    data = load_dataset(csv, cache_dir=None)
    short = tmp_path / "short.csv"
    pd.read_csv(path).head(10).to_csv(short, index=False)
    with pytest.raises(DataError, match="10 FER\\+ rows, but the CSV has data row 60"):
        apply_ferplus(data, short)
    swapped = pd.read_csv(path)
    swapped.loc[3, "Usage"] = "PrivateTest" if swapped.loc[3, "Usage"] != "PrivateTest" else "Training"
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    with pytest.raises(DataError, match="line 5: Usage .* do not match row for row"):
        apply_ferplus(data, tmp_path / "swapped.csv")
    bad = pd.read_csv(path)
    bad["fear"] = bad["fear"].astype(str)
    bad.loc[7, "fear"] = "x"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="line 9: fear vote 'x' is not a non-negative integer"):
        apply_ferplus(data, tmp_path / "bad.csv")
    with pytest.raises(DataError, match="header lacks FER\\+ column"):
        (tmp_path / "hdr.csv").write_text("a,b\n1,2\n")
        apply_ferplus(data, tmp_path / "hdr.csv")
