"""Tests for ``fer_ray.data.ingest``: every format, every malformed input, skip mode and the parquet cache.

All fixtures are generated in ``tmp_path`` (small CSVs written as text, PNG/JPEG files written with PIL).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_ray.data import ingest
from fer_ray.data.dataset import CLASSES, USAGES, DataError
from fer_ray.data.ingest import csv as ingest_csv
from fer_ray.data.ingest import detect_format, load_dataset, load_dataset_with_report, require_splits

HEADER = "emotion,pixels,Usage"


def make_rows(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random images / labels / usage codes; every class and usage appears when n >= 21."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    usage = (np.arange(n) // len(CLASSES)) % len(USAGES)
    return images, labels.astype(np.int64), usage.astype(np.int8)


def csv_lines(images: np.ndarray, labels: np.ndarray, usage: np.ndarray) -> list[str]:
    """Header plus one line per row (line i+2 holds row i)."""
    return [HEADER] + [f"{lab},{' '.join(map(str, img.ravel().tolist()))},{USAGES[u]}"
                       for img, lab, u in zip(images, labels, usage)]


def write_csv(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def valid_csv(tmp_path: Path, n: int = 30, name: str = "fer2013.csv") -> tuple[Path, tuple]:
    rows = make_rows(n)
    return write_csv(tmp_path / name, csv_lines(*rows)), rows


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(os.listdir(cache_dir)) if cache_dir.exists() else []


def write_image(path: Path, pixels: np.ndarray, mode: str = "L", size: int = 48) -> np.ndarray:
    """Write ``pixels`` (48x48 uint8) as an image of ``mode``/``size``; returns what the loader should yield."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pixels, "L")
    if mode != "L":
        im = im.convert(mode)
    if size != 48:
        im = im.resize((size, size), Image.Resampling.NEAREST)
    im.save(path)
    with Image.open(path) as back:
        out = back.convert("L")
        if out.size != (48, 48):
            out = out.resize((48, 48), Image.Resampling.BILINEAR)
        return np.asarray(out)


# --------------------------------------------------------------------------------------------- CSV


def test_csv_loads_arrays_and_line_ids(tmp_path: Path) -> None:
    path, (images, labels, usage) = valid_csv(tmp_path)
    data = load_dataset(path)
    assert data.images.dtype == np.uint8 and data.images.shape == (30, 48, 48)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int64 and data.usage.dtype == np.int8
    np.testing.assert_array_equal(data.usage, usage)
    assert data.ids.dtype == object and list(data.ids[:2]) == ["row:2", "row:3"] and data.ids[-1] == "row:31"


def test_csv_crlf_blank_lines_bom_loose_spacing(tmp_path: Path) -> None:
    images, labels, usage = make_rows(4)
    lines = csv_lines(images, labels, usage)
    pix = lines[2].split(",")[1].split(" ")
    pix[0] = "0" + pix[0]  # leading zero
    lines[2] = f"{labels[1]},  {chr(9).join(pix)}  , {USAGES[usage[1]].lower()} "  # tabs, padding, lower-case usage
    lines.insert(3, "")  # blank line 4
    path = tmp_path / "x.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    data = load_dataset(path)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.usage, usage)
    assert list(data.ids) == ["row:2", "row:3", "row:5", "row:6"]


def test_csv_without_usage_is_training(tmp_path: Path) -> None:
    images, labels, _ = make_rows(5)
    lines = ["pixels,emotion"] + [f"{' '.join(map(str, im.ravel()))},{lab}" for im, lab in zip(images, labels)]
    data = load_dataset(write_csv(tmp_path / "x.csv", lines), fmt="csv")
    assert (data.usage == 0).all()
    np.testing.assert_array_equal(data.labels, labels)


def _replace_pixel(line: str, k: int, value: str) -> str:
    label, pixels, usage = line.split(",")
    toks = pixels.split(" ")
    toks[k] = value
    return f"{label},{' '.join(toks)},{usage}"


def _drop_last_pixel(line: str) -> str:
    label, pixels, usage = line.split(",")
    return f"{label},{pixels.rsplit(' ', 1)[0]},{usage}"


# (name, edit of the 30-row CSV lines -> bytes, expected "line N: problem" regex)
MALFORMED = [
    ("empty", lambda ls: b"", r"line 1: empty file"),
    ("blank", lambda ls: b"\n\n  \n", r"line 1: empty file"),
    ("header_only", lambda ls: b"emotion,pixels,Usage\n", r"line 1: header only, no data rows"),
    ("missing_header", lambda ls: "\n".join(ls[1:]).encode(), r"line 1: missing header.*add the header line"),
    ("wrong_header", lambda ls: "\n".join(["label,pixels,Usage"] + ls[1:]).encode(),
     r"line 1: header 'label,pixels,Usage' lacks column\(s\) emotion"),
    ("pixel_count", lambda ls: "\n".join(ls[:5] + [_drop_last_pixel(ls[5])] + ls[6:]).encode(),
     r"line 6: 2303 pixels, expected 2304"),
    ("no_pixels", lambda ls: "\n".join(ls[:5] + ["3,,Training"] + ls[6:]).encode(), r"line 6: no pixels"),
    ("non_integer", lambda ls: "\n".join(ls[:5] + [_replace_pixel(ls[5], 6, "12a")] + ls[6:]).encode(),
     r"line 6: pixel 7 is '12a', not an integer"),
    ("float_pixel", lambda ls: "\n".join(ls[:5] + [_replace_pixel(ls[5], 0, "1.5")] + ls[6:]).encode(),
     r"line 6: pixel 1 is '1.5', not an integer"),
    ("pixel_256", lambda ls: "\n".join(ls[:7] + [_replace_pixel(ls[7], 100, "256")] + ls[8:]).encode(),
     r"line 8: pixel 101 is 256, outside 0-255"),
    ("pixel_negative", lambda ls: "\n".join(ls[:7] + [_replace_pixel(ls[7], 2, "-3")] + ls[8:]).encode(),
     r"line 8: pixel 3 is -3, outside 0-255"),
    ("pixel_huge", lambda ls: "\n".join(ls[:7] + [_replace_pixel(ls[7], 2, "99999999999")] + ls[8:]).encode(),
     r"line 8: pixel 3 is 99999999999, outside 0-255"),
    ("label_7", lambda ls: "\n".join(ls[:9] + ["7" + ls[9][1:]] + ls[10:]).encode(), r"line 10: emotion 7 outside 0-6"),
    ("label_text", lambda ls: "\n".join(ls[:9] + ["x" + ls[9][1:]] + ls[10:]).encode(),
     r"line 10: emotion 'x' is not an integer"),
    ("usage", lambda ls: "\n".join(ls[:3] + [ls[3].rsplit(",", 1)[0] + ",Validation"] + ls[4:]).encode(),
     r"line 4: unknown Usage 'Validation'"),
    ("truncated_last", lambda ls: ("\n".join(ls[:-1]) + "\n" + ls[-1][:3000]).encode(),
     r"line 31: expected 3 comma-separated fields .* got 2; the line is truncated"),
    ("truncated_label_only", lambda ls: ("\n".join(ls[:-1]) + "\n3").encode(), r"line 31: expected 3 .* got 1"),
    ("extra_field", lambda ls: "\n".join(ls[:4] + [ls[4] + ",x"] + ls[5:]).encode(), r"line 5: expected 3 .* got 4"),
    ("non_utf8", lambda ls: "\n".join(ls[:11]).encode() + b"\n" + ls[11].encode()[:-2] + b"\xff\xfe\n"
     + "\n".join(ls[12:]).encode(), r"line 12: non-UTF-8 byte 0xff"),
    ("duplicate_header", lambda ls: "\n".join(ls[:16] + [HEADER] + ls[16:]).encode(),
     r"line 17: duplicate header line mid-file"),
]


@pytest.mark.parametrize("name,edit,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_csv_malformed_names_file_and_line(tmp_path: Path, name: str, edit, expected: str) -> None:
    lines = csv_lines(*make_rows(30))
    path = tmp_path / "bad.csv"
    path.write_bytes(edit(lines))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        load_dataset(path, cache_dir=cache)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(re.escape(str(path)) + ": " + expected, msg), msg
    assert cache_files(cache) == []


def test_missing_file_and_undetectable_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.csv")) + ": .*not found"):
        load_dataset(tmp_path / "nope.csv", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nope.csv", fmt="csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="cannot detect the dataset format"):
        load_dataset(tmp_path / "empty_dir")
    assert cache_files(tmp_path / "cache") == []
    with pytest.raises(ValueError, match="on_bad_row"):
        load_dataset(tmp_path, on_bad_row="ignore")


def test_csv_skip_drops_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, labels, usage = make_rows(30)
    lines = csv_lines(images, labels, usage)
    lines[3] = "9" + lines[3][1:]  # row 2: bad label
    lines[6] = _replace_pixel(lines[6], 0, "abc")  # row 5: bad pixel
    lines[-1] = lines[-1][:500]  # row 29: truncated
    encoded = [line.encode() for line in lines]
    encoded[10] = encoded[10][:-3] + b"\xe9ng"  # row 9: a latin-1 byte in the Usage field
    raw = b"\n".join(encoded)
    path = tmp_path / "skip.csv"
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="fer_ray.data.ingest"):
        data, report = load_dataset_with_report(path, on_bad_row="skip")
    keep = np.setdiff1d(np.arange(30), [2, 5, 9, 29])
    assert report.skipped == 4 and len(data) == 26
    np.testing.assert_array_equal(data.images, images[keep])
    np.testing.assert_array_equal(data.labels, labels[keep])
    assert list(data.ids) == [f"row:{i + 2}" for i in keep]
    assert "skipped 4 bad rows of" in caplog.text and "line 4: emotion 9 outside 0-6" in caplog.text
    assert any("line 11: non-UTF-8" in p for p in report.problems)


# --------------------------------------------------------------------------------------------- folders


def test_folders_prefixes_case_and_resize(tmp_path: Path) -> None:
    images, _, _ = make_rows(6)
    root = tmp_path / "imgs"
    want = {
        "Train/Angry/Training_1.png": (write_image(root / "Train/Angry/Training_1.png", images[0]), 0, 0),
        "Train/HAPPY/b.png": (write_image(root / "Train/HAPPY/b.png", images[1], "RGB", 64), 3, 0),
        "test/neutral/PublicTest_3.jpg": (write_image(root / "test/neutral/PublicTest_3.jpg", images[2]), 6, 1),
        "test/neutral/PrivateTest_4.png": (write_image(root / "test/neutral/PrivateTest_4.png", images[3]), 6, 2),
        "test/Sad/c.jpeg": (write_image(root / "test/Sad/c.jpeg", images[4], "RGB", 32), 4, 1),
        "Train/Surprise/d.png": (write_image(root / "Train/Surprise/d.png", images[5], "LA", 96), 5, 0),
    }
    (root / "Train/Angry/notes.txt").write_text("ignored")
    (root / "Train/Angry/.DS_Store").write_bytes(b"\0")
    data = load_dataset(root)
    assert sorted(data.ids) == sorted(want) and list(data.ids) == sorted(data.ids)
    for i, rel in enumerate(data.ids):
        pixels, label, usage = want[rel]
        np.testing.assert_array_equal(data.images[i], pixels)
        assert (data.labels[i], data.usage[i]) == (label, usage), rel
    np.testing.assert_array_equal(data.images[list(data.ids).index("Train/Angry/Training_1.png")], images[0])
    (root / "train").mkdir()
    with pytest.raises(DataError, match="duplicate train folder"):
        load_dataset(root)


def test_folders_val_layout(tmp_path: Path) -> None:
    images, _, _ = make_rows(3)
    for split, img in zip(("train", "val", "test"), images):
        write_image(tmp_path / split / "fear" / "x.png", img)
    data = load_dataset(tmp_path, fmt="folders")
    assert dict(zip(data.ids, data.usage.tolist())) == {"train/fear/x.png": 0, "val/fear/x.png": 1,
                                                         "test/fear/x.png": 2}


@pytest.mark.parametrize("case", ["garbage", "truncated", "unknown_class", "empty_class"])
def test_folders_malformed(tmp_path: Path, case: str) -> None:
    root = tmp_path / "imgs"
    images, _, _ = make_rows(3)
    write_image(root / "train/angry/a.png", images[0])
    write_image(root / "test/disgust/b.jpg", images[1])
    if case == "garbage":
        bad = root / "train/angry/z.jpg"
        bad.write_bytes(b"not an image")
        expected = re.escape(str(bad)) + r": cannot decode image"
    elif case == "truncated":
        bad = root / "test/disgust/c.png"
        write_image(bad, images[2])
        bad.write_bytes(bad.read_bytes()[:200])
        expected = re.escape(str(bad)) + r": cannot decode image"
    elif case == "unknown_class":
        write_image(root / "train/contempt/c.png", images[2])
        expected = re.escape(str(root / "train/contempt")) + r": unknown class folder 'contempt'"
    else:
        (root / "train/Fear").mkdir()
        expected = re.escape(str(root / "train/Fear")) + r": empty class folder"
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        load_dataset(root, cache_dir=cache)
    assert re.search(expected, str(err.value)) and "\n" not in str(err.value), str(err.value)
    assert cache_files(cache) == []
    data, report = load_dataset_with_report(root, on_bad_row="skip")
    assert sorted(data.ids) == ["test/disgust/b.jpg", "train/angry/a.png"]
    assert report.skipped == (0 if case == "empty_class" else 1) and report.problems


# --------------------------------------------------------------------------------------------- torchvision


def test_torchvision_train_test_csv(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, labels, _ = make_rows(10)
    base = tmp_path / "fer2013"
    base.mkdir()
    pix = [" ".join(map(str, im.ravel())) for im in images]
    write_csv(base / "train.csv", ["emotion,pixels"] + [f"{lab},{p}" for lab, p in zip(labels[:6], pix[:6])])
    write_csv(base / "test.csv", ["pixels"] + pix[6:])  # unlabelled Kaggle test set
    with caplog.at_level(logging.WARNING, logger="fer_ray.data.ingest"):
        data = load_dataset(tmp_path)
    assert "no emotion column" in caplog.text
    assert len(data) == 6 and (data.usage == 0).all() and data.ids[0] == "fer2013/train.csv:row:2"
    np.testing.assert_array_equal(data.images, images[:6])
    write_csv(base / "test.csv", ["emotion,pixels"] + [f"{lab},{p}" for lab, p in zip(labels[6:], pix[6:])])
    data = load_dataset(tmp_path, fmt="torchvision")
    assert len(data) == 10 and data.usage.tolist() == [0] * 6 + [1] * 4
    assert data.ids[6] == "fer2013/test.csv:row:2"
    np.testing.assert_array_equal(data.labels, labels)


def test_torchvision_icml(tmp_path: Path) -> None:
    images, labels, usage = make_rows(21)
    lines = ["emotion, Usage, pixels"] + [f"{lab},{USAGES[u]},{' '.join(map(str, im.ravel()))}"
                                          for im, lab, u in zip(images, labels, usage)]
    (tmp_path / "fer2013").mkdir()
    write_csv(tmp_path / "fer2013" / "icml_face_data.csv", lines)
    write_csv(tmp_path / "fer2013" / "train.csv", ["emotion,pixels"])  # ignored: icml wins
    data = load_dataset(tmp_path)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.usage, usage)
    assert data.ids[0] == "fer2013/icml_face_data.csv:row:2"


def test_auto_detection(tmp_path: Path) -> None:
    path, _ = valid_csv(tmp_path)
    assert detect_format(path) == ("csv", path)
    folders = tmp_path / "f"
    write_image(folders / "test/angry/a.png", make_rows(1)[0][0])
    assert detect_format(folders) == ("folders", folders)
    nested = tmp_path / "n"
    write_image(nested / "fer2013/train/angry/a.png", make_rows(1)[0][0])
    assert detect_format(nested) == ("folders", nested / "fer2013")
    tv = tmp_path / "tv"
    (tv / "fer2013").mkdir(parents=True)
    (tv / "fer2013" / "train.csv").write_text("emotion,pixels\n")
    assert detect_format(tv) == ("torchvision", tv)


# --------------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_parsing_and_rebuilds_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = valid_csv(tmp_path)
    cache = tmp_path / "cache"
    first, rep1 = load_dataset_with_report(path, cache_dir=cache)
    assert not rep1.cache_hit and re.fullmatch(r"csv-[0-9a-f]{16}\.parquet", cache_files(cache)[0])
    assert len(cache_files(cache)) == 1

    def boom(*args, **kwargs):
        raise AssertionError("parsed again")

    with monkeypatch.context() as m:
        m.setattr(ingest_csv, "parse_csv", boom)
        second, rep2 = load_dataset_with_report(path, cache_dir=cache)
    assert rep2.cache_hit
    for name in ("images", "labels", "usage", "ids"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert second.images.flags.writeable

    lines = path.read_text().splitlines()
    lines[1] = ("6" if lines[1][0] != "6" else "5") + lines[1][1:]
    path.write_text("\n".join(lines) + "\n")
    third, rep3 = load_dataset_with_report(path, cache_dir=cache)
    assert not rep3.cache_hit and third.labels[0] != first.labels[0]
    assert len(cache_files(cache)) == 2 and all(f.endswith(".parquet") for f in cache_files(cache))


def test_cache_skip_mode_and_corrupt_file(tmp_path: Path) -> None:
    lines = csv_lines(*make_rows(30))
    lines[5] = "8" + lines[5][1:]
    path = write_csv(tmp_path / "x.csv", lines)
    cache = tmp_path / "cache"
    with pytest.raises(DataError):
        load_dataset(path, cache_dir=cache)
    assert cache_files(cache) == []
    _, rep = load_dataset_with_report(path, cache_dir=cache, on_bad_row="skip")
    _, rep2 = load_dataset_with_report(path, cache_dir=cache, on_bad_row="skip")
    assert rep2.cache_hit and rep2.skipped == rep.skipped == 1 and rep2.problems == rep.problems
    with pytest.raises(DataError):  # the skip-mode cache entry must not serve error mode
        load_dataset(path, cache_dir=cache)
    rep2.cache_path.write_bytes(b"garbage")
    data, rep3 = load_dataset_with_report(path, cache_dir=cache, on_bad_row="skip")
    assert not rep3.cache_hit and len(data) == 29
    assert load_dataset_with_report(path, cache_dir=cache, on_bad_row="skip")[1].cache_hit


def test_folder_cache_invalidated_by_touch(tmp_path: Path) -> None:
    images, _, _ = make_rows(2)
    write_image(tmp_path / "train/angry/a.png", images[0])
    write_image(tmp_path / "test/happy/b.png", images[1])
    cache = tmp_path / "cache"
    load_dataset(tmp_path, cache_dir=cache)
    assert load_dataset_with_report(tmp_path, cache_dir=cache)[1].cache_hit
    write_image(tmp_path / "train/angry/a.png", images[1])
    st = (tmp_path / "train/angry/a.png").stat()
    os.utime(tmp_path / "train/angry/a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    data, rep = load_dataset_with_report(tmp_path, cache_dir=cache)
    assert not rep.cache_hit
    np.testing.assert_array_equal(data.images[1], images[1])


# --------------------------------------------------------------------------------------------- cross-format


def test_csv_to_png_folders_roundtrip(tmp_path: Path) -> None:
    path, _ = valid_csv(tmp_path, n=28)
    from_csv = load_dataset(path)
    root = tmp_path / "folders"
    for img, lab, use, rid in zip(from_csv.images, from_csv.labels, from_csv.usage, from_csv.ids):
        folder = root / ("train" if use == 0 else "test") / CLASSES[lab]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{USAGES[use]}_{rid.split(':')[1]}.png")
    from_dirs = load_dataset(root)
    order = np.argsort([int(re.search(r"_(\d+)\.png$", i).group(1)) for i in from_dirs.ids])
    np.testing.assert_array_equal(from_dirs.images[order], from_csv.images)
    np.testing.assert_array_equal(from_dirs.labels[order], from_csv.labels)
    np.testing.assert_array_equal(from_dirs.usage[order], from_csv.usage)


def test_require_splits(tmp_path: Path) -> None:
    images, labels, usage = make_rows(10)
    path = write_csv(tmp_path / "x.csv", csv_lines(images, labels, np.where(usage == 2, 1, usage)))
    data = load_dataset(path)
    require_splits(data, ["Training", "PublicTest", "train", "val", "public_test"], path)
    with pytest.raises(DataError, match=re.escape(f"zero rows for split PrivateTest in {path}")):
        require_splits(data, ["Training", "PrivateTest"], path)
    with pytest.raises(DataError, match=r"zero rows for split private_test \(usage PrivateTest\)"):
        require_splits(data, ["private_test"], path)
    with pytest.raises(DataError, match=re.escape(f"unknown split 'test' required for {path}; use one of")):
        require_splits(data, ["test"], path)


def test_require_splits_run_defaults(tmp_path: Path) -> None:
    """The default ``needed`` is the splits every run fits and selects on; ``path`` is optional."""
    assert ingest.RUN_SPLITS == ("train", "val")
    images, labels, usage = make_rows(10)
    data = load_dataset(write_csv(tmp_path / "x.csv", csv_lines(images, labels, usage)))
    require_splits(data)
    no_training = data.subset(np.flatnonzero(data.usage != 0))
    with pytest.raises(DataError, match=r"^zero rows for split train \(usage Training\); the data has Training 0, "):
        require_splits(no_training)
    with pytest.raises(DataError, match=r"zero rows for split train \(usage Training\) in data/x; "):
        require_splits(no_training, path="data/x")


def test_ingest_functions_stay_short() -> None:
    """Issue 15: the ingest package is split by format with no function over 60 lines."""
    import ast

    root = Path(ingest.__file__).parent
    long = []
    for file in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{file.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_the_run_path_refuses_a_dataset_without_training_rows(tmp_path):
    """``prepare_dataset`` (what every sweep, tta and distill goes through) stops with one line naming the file
    when the data has no Training rows, instead of a KeyError inside a Ray worker."""
    from fer_ray.config import DataConfig
    from fer_ray.data import prepare_dataset
    from fer_ray.data.synthetic import generate, write_csv

    data = generate(140, seed=2)
    only_test = data.subset(np.flatnonzero(data.usage != 0))
    csv = write_csv(tmp_path / "test_only.csv", only_test)
    with pytest.raises(DataError, match=r"zero rows for split train \(usage Training\) in .*test_only.csv"):
        prepare_dataset(DataConfig(path=str(csv), cache_dir=str(tmp_path / "c")))
