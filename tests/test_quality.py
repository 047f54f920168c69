"""Duplicate audit, dedup modes, grouped validation split and the ``data check``/``data report`` commands."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_ray.cli import main
from fer_ray.config import ConfigError, DataConfig
from fer_ray.data import CLASSES, FERData, split_indices
from fer_ray.data import quality as q
from fer_ray.data.synthetic import generate, write_csv

N = 300


def _jpeg(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=75)
    return np.array(Image.open(buf))


@pytest.fixture(scope="module")
def planted():
    """Synthetic set plus planted copies; returns (data, {name: (source index, planted index)})."""
    base = generate(N, seed=0)
    train = np.flatnonzero(base.usage == 0)
    test = np.flatnonzero(base.usage == 1)
    src = {"exact_cross": test[0], "exact_conflict": test[1], "exact_within": train[2],
           "roll": test[3], "jpeg": test[4]}
    imgs = {"exact_cross": base.images[src["exact_cross"]], "exact_conflict": base.images[src["exact_conflict"]],
            "exact_within": base.images[src["exact_within"]], "roll": np.roll(base.images[src["roll"]], 1, axis=1),
            "jpeg": _jpeg(base.images[src["jpeg"]])}
    labels = {k: base.labels[i] for k, i in src.items()}
    labels["exact_conflict"] = (labels["exact_conflict"] + 1) % len(CLASSES)
    names = list(src)
    blank = np.full((1, 48, 48), 128, np.uint8)
    data = FERData(np.concatenate([base.images, np.stack([imgs[k] for k in names]), blank]),
                   np.concatenate([base.labels, [labels[k] for k in names], [6]]).astype(np.int64),
                   np.concatenate([base.usage, np.zeros(len(names) + 1, np.int8)]).astype(np.int8),
                   np.concatenate([base.ids, [f"planted:{k}" for k in names], ["planted:blank"]]).astype(object))
    return data, {k: (int(src[k]), N + j) for j, k in enumerate(names)}


def test_hashes_are_vectorised_and_stable():
    data = generate(50, seed=1)
    h = q.perceptual_hashes(data.images)
    assert h.dtype == np.uint64 and h.shape == (50,)
    assert np.array_equal(h[10:20], q.perceptual_hashes(data.images[10:20]))
    assert len(np.unique(q.pixel_hashes(data.images))) == 50
    brighter = np.clip(data.images.astype(int) + 20, 0, 255).astype(np.uint8)
    assert np.bitwise_count(h ^ q.perceptual_hashes(brighter)).max() <= 4


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    h[200:] = h[:200] ^ (np.uint64(1) << rng.integers(0, 64, 200).astype(np.uint64))  # one flipped bit each
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    for t in (0, 1, 3):
        expected = np.argwhere(np.triu(d <= t, k=1))
        assert np.array_equal(q.near_pairs(h, t), expected)


def test_check_finds_planted_groups(planted):
    data, pairs = planted
    df = q.check(data)
    groups = {k: df[df["index"].isin(v)] for k, v in pairs.items()}
    for name in ("exact_cross", "exact_conflict", "exact_within"):
        g = groups[name][groups[name].kind == "exact"]
        assert g.group_id.nunique() == 1 and len(g) == 2, name
    assert groups["exact_cross"].cross_split.all() and groups["exact_cross"].leakage.all()
    assert not groups["exact_cross"].label_conflict.any()
    assert groups["exact_conflict"].label_conflict.all()
    assert not groups["exact_within"].cross_split.any()
    for name in ("roll", "jpeg"):
        g = groups[name][groups[name].kind == "near"]
        assert g.group_id.nunique() == 1 and len(g) == 2, name
        assert g.leakage.all()
    # ... and nothing else, among the 300 other synthetic people.
    assert set(df.loc[df.kind == "near", "index"]) == {i for k in ("roll", "jpeg") for i in pairs[k]}
    assert set(df.loc[df.kind == "exact", "index"]) == {i for k in pairs if k.startswith("exact") for i in pairs[k]}
    blank = df[df.kind == "blank"]
    assert blank.id.tolist() == ["planted:blank"]
    summary = q.summarize(df)
    assert summary["exact_groups"] == 3 and summary["near_groups"] == 2 and summary["blank_images"] == 1
    assert summary["label_conflict_groups"] == 1 and summary["cross_split_groups"] == 4
    assert summary["leaking_training_images"] == 4  # exact_cross, exact_conflict, roll, jpeg copies


def test_clean_synthetic_has_no_exact_duplicates_or_blanks():
    df = q.check(generate(N, seed=0))
    assert set(df.kind) <= {"near"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_synthetic_has_no_near_duplicates(seed):
    """Different synthetic people are not near duplicates (the planted tests rely on it: "and nothing else")."""
    df = q.check(generate(N, seed=seed))
    assert df.empty, df


@pytest.mark.parametrize("mode, dropped", [("none", set()), ("within", {"exact_within"}),
                                           ("leakage", {"exact_cross", "exact_conflict", "roll", "jpeg"}),
                                           ("both", {"exact_within", "exact_cross", "exact_conflict", "roll", "jpeg"})])
def test_dedup_modes_drop_the_planted_copies(planted, mode, dropped):
    sub, _ = planted
    out, info = q.dedup(sub, mode)
    gone = set(sub.ids) - set(out.ids)
    assert gone == {f"planted:{k}" for k in dropped}
    assert info["before"] - info["after"] == len(dropped) and sorted(info["dropped_ids"]) == sorted(gone)


def test_config_validates_dedup():
    assert DataConfig(dedup="both", near_dup_threshold=2).dedup == "both"
    with pytest.raises(ConfigError, match="dedup"):
        DataConfig(dedup="all")
    with pytest.raises(ConfigError, match="near_dup_threshold"):
        DataConfig(near_dup_threshold=-1)


def test_grouped_split_keeps_duplicates_together(planted):
    data, _ = planted
    assert all(np.array_equal(a, b) for a, b in zip(split_indices(data, 0.5, seed=1).values(),
                                                    split_indices(data, 0.5, seed=1, groups=None).values()))
    groups = q.exact_groups(data)
    for seed in range(5):
        s = split_indices(data, 0.5, seed=seed, groups=groups)
        assert not set(groups[s["train"]]) & set(groups[s["val"]])
        assert len(np.intersect1d(s["train"], s["val"])) == 0


def test_cli_check_and_report(tmp_path, capsys):
    data = generate(140, seed=3)
    data.images[5] = data.images[100]
    csv = write_csv(tmp_path / "fer2013.csv", data)
    out = tmp_path / "groups.csv"
    cache = str(tmp_path / "cache")
    assert main(["data", "check", str(csv), "--out", str(out), "--cache-dir", cache, "--threshold", "0"]) == 0
    assert "exact_groups" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert set(table.loc[table.kind == "exact", "index"]) == {5, 100}
    assert main(["data", "report", str(csv), "--out", str(tmp_path / "eda"), "--cache-dir", cache]) == 0
    for name in ("index.html", "class_counts.csv", "class_chart.png", "samples.png", "pixel_stats.csv"):
        assert (tmp_path / "eda" / name).is_file(), name
    page = (tmp_path / "eda" / "index.html").read_text()
    assert all(c in page for c in CLASSES) and "data:image/png;base64," in page
    with pytest.raises(SystemExit):
        main(["data", "check", "--help"])
    assert "--threshold" in capsys.readouterr().out


def test_training_split_groups_duplicates_by_default(tmp_path):
    """prepare_dataset carves val by near-duplicate groups by default: pixel-identical and 1-px-shifted copies never
    straddle train/val; ``exact`` keeps only identical copies together, ``none``/``false`` neither."""
    from fer_ray.data import prepare_dataset
    from fer_ray.data.quality import shifted

    data = generate(400, seed=4)
    train = np.flatnonzero(data.usage == 0)
    for a, b in zip(train[:40], train[40:80], strict=True):  # 40 pixel-identical Training pairs
        data.images[b] = data.images[a]
    for a, b in zip(train[80:120], train[120:160], strict=True):  # 40 near copies (shifted by one pixel)
        data.images[b] = shifted(data.images[a:a + 1], 1, 0)[0]
    csv = write_csv(tmp_path / "fer2013.csv", data)
    assert DataConfig().group_duplicates == "near" and DataConfig().dedup == "leakage"

    def straddling(group, lo: int) -> int:
        _, splits = prepare_dataset(DataConfig(path=str(csv), cache_dir=str(tmp_path / "c"), val_fraction=0.5,
                                               group_duplicates=group))
        val = set(splits["val"].tolist())
        return sum((a in val) != (b in val) for a, b in zip(train[lo:lo + 40], train[lo + 40:lo + 80], strict=True))

    assert straddling("near", 0) == 0 and straddling("near", 80) == 0
    assert straddling(True, 0) == 0 and straddling("exact", 80) > 0  # exact grouping misses the shifted copies
    assert straddling(False, 0) > 0  # at val_fraction 0.5, ungrouped pairs straddle about half the time
