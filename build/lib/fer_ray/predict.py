"""``fer-ray predict``: run a bundle (``fer_ray.bundle``: a folder or a bucket URI) on photos, folders, a
``fer2013.csv`` or a video.

This module owns turning inputs into 48x48 grayscale faces and faces into rows:

* inputs (``plan_inputs``): image files, folders (searched recursively for images and videos, in path order), a
  Kaggle ``fer2013.csv`` (its 48x48 rows are faces already; its labels are kept), a video (every k-th frame, read
  with OpenCV); with ``labels`` a folder is read as a labelled dataset (``train/<class>/`` or a flat ``<class>/``
  layout, with a class map: ``fer_ray.data.ingest``) and every row carries its true class;
* faces (``FaceDetector``): ``detect`` finds them with OpenCV's frontal-face Haar cascade, which ships inside
  ``opencv-python-headless`` (no download), and crops each box with a margin; ``whole`` takes the whole image as one
  face, decoded exactly as the dataset loader decodes image folders (grayscale, bilinear resize to 48x48), so
  ``predict --faces whole`` on a labelled folder scores the images ``fer-ray evaluate`` scores;
* rows (``predict``): one per face, in input order: source, frame, face index, box (x, y, w, h in the source's
  pixels), the 7 probabilities ``p_<class>``, label, confidence, ``error`` (and ``true_label`` for labelled
  inputs). An unreadable file, an image or frame without a face, an empty folder or a missing path is a row with
  an ``error`` and no probabilities; the run goes on. Faces are scored in batches; long runs show a progress bar
  (tqdm on a terminal, else a line every 10 %).
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_ray.bundle import Bundle
from fer_ray.config import ConfigError
from fer_ray.data.dataset import CLASSES, IMG_SIZE, DataError
from fer_ray.data.ingest import IMAGE_SUFFIXES

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp"})
FACE_MODES = ("detect", "whole")
OUT_SUFFIXES = (".csv", ".parquet")
CASCADE = "haarcascade_frontalface_default.xml"
"""OpenCV's frontal-face cascade (``cv2.data.haarcascades``)."""
MARGIN = 0.1
"""Share of the detected box's width/height added on each side before cropping: FER-2013's faces are framed a
little wider than the cascade's box (on fer_ray's synthetic faces the 48x48 crop is ~1.17x the box)."""
PROB_COLUMNS = [f"p_{c}" for c in CLASSES]
COLUMNS = ["source", "frame", "face", "x", "y", "w", "h", *PROB_COLUMNS, "label", "confidence", "error"]
PROGRESS_MIN = 200
"""Runs with at least this many images/frames show progress."""


@dataclass
class Face:
    """One unit of output: a face to score (``pixels``), or an input that yielded none (``error``)."""

    source: str
    frame: int | None = None
    face: int | None = None
    box: tuple[int, int, int, int] | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    true_label: int | None = None


@dataclass
class Source:
    """One input to read: ``kind`` is image, video, csv or error; ``count`` its images/frames (for progress)."""

    kind: str
    path: str
    label: int | None = None
    error: str | None = None
    count: int = 1
    data: object = field(default=None, repr=False)


def whole_face(im: Image.Image) -> np.ndarray:
    """The whole image as one 48x48 face: ``fer_ray.data.ingest``'s decoding (grayscale, bilinear resize)."""
    out = im if im.mode == "L" else im.convert("L")
    if out.size != (IMG_SIZE, IMG_SIZE):
        out = out.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def open_image(blob: bytes) -> Image.Image:
    """Decode image bytes (any format PIL reads); ``DataError`` with the reason when it cannot."""
    try:
        im = Image.open(io.BytesIO(blob))
        im.load()
        return im
    except UnidentifiedImageError:
        raise DataError("cannot decode image (not an image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image ({' '.join(str(e).split()) or type(e).__name__})") from None


class FaceDetector:
    """OpenCV's Haar cascade (``CASCADE``), and crops of what it finds as 48x48 grayscale faces."""

    def __init__(self, margin: float = MARGIN, scale_factor: float = 1.1, min_neighbors: int = 4,
                 cascade: str = CASCADE) -> None:
        import cv2

        path = os.path.join(cv2.data.haarcascades, cascade)
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise ConfigError(f"{path}: OpenCV could not load the face cascade (is opencv-python-headless 4.x "
                              "installed? OpenCV 5 dropped the Haar cascades)")
        self.margin, self.scale_factor, self.min_neighbors = margin, scale_factor, min_neighbors

    def boxes(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes ``(x, y, w, h)`` in ``gray`` (uint8 ``[H, W]``), left to right; a box whose centre lies inside
        a larger box (an eye or mouth the cascade also took for a face) is dropped."""
        side = max(24, round(0.04 * min(gray.shape)))
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(side, side))
        boxes = sorted(((int(x), int(y), int(w), int(h)) for x, y, w, h in (found if len(found) else [])),
                       key=lambda b: -b[2] * b[3])
        kept: list[tuple[int, int, int, int]] = []
        for x, y, w, h in boxes:
            cx, cy = x + w / 2, y + h / 2
            if not any(kx <= cx <= kx + kw and ky <= cy <= ky + kh for kx, ky, kw, kh in kept):
                kept.append((x, y, w, h))
        return sorted(kept)

    def crop(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """The box widened by ``margin`` on each side (clipped to the image), as a 48x48 face."""
        x, y, w, h = box
        mx, my = round(self.margin * w), round(self.margin * h)
        top, left = max(0, y - my), max(0, x - mx)
        patch = gray[top:min(gray.shape[0], y + h + my), left:min(gray.shape[1], x + w + mx)]
        return whole_face(Image.fromarray(np.ascontiguousarray(patch)))


def faces_of(im: Image.Image | np.ndarray, mode: str, detector: FaceDetector | None, source: str,
             frame: int | None = None, label: int | None = None) -> list[Face]:
    """The faces of one image or video frame (PIL image, or a uint8 grayscale array)."""
    if mode == "whole":
        pixels = whole_face(im if isinstance(im, Image.Image) else Image.fromarray(im))
        h, w = (im.size[1], im.size[0]) if isinstance(im, Image.Image) else im.shape[:2]
        return [Face(source, frame, 0, (0, 0, int(w), int(h)), pixels, true_label=label)]
    gray = np.asarray(ImageOps.exif_transpose(im).convert("L")) if isinstance(im, Image.Image) else im
    boxes = detector.boxes(gray)
    if not boxes:
        return [Face(source, frame, error="no face found", true_label=label)]
    return [Face(source, frame, i, b, detector.crop(gray, b), true_label=label) for i, b in enumerate(boxes)]


def image_faces(blob: bytes, mode: str, detector: FaceDetector | None, source: str,
                label: int | None = None) -> list[Face]:
    """The faces of one encoded image (a file's bytes, an HTTP body); an undecodable one is an error row."""
    try:
        im = open_image(blob)
    except DataError as e:
        return [Face(source, error=str(e), true_label=label)]
    return faces_of(im, mode, detector, source, label=label)


def video_faces(path: str, mode: str, detector: FaceDetector | None, every_k: int,
                tick: Callable[[int], None]) -> Iterator[Face]:
    """The faces of every ``every_k``-th frame of a video (skipped frames are grabbed, not decoded)."""
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        yield Face(path, error="cannot open video (OpenCV could not read it)")
        return
    try:
        index, read_any = 0, False
        while True:
            if index % every_k:
                if not cap.grab():
                    break
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                read_any = True
                gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                yield from faces_of(gray, mode, detector, path, frame=index)
                tick(1)
            index += 1
        if not read_any:
            yield Face(path, error="no frames could be read from the video")
    finally:
        cap.release()


def _folder(path: Path, labels: bool, class_map: str | None) -> list[Source]:
    if labels:
        from fer_ray.data.ingest import labelled_files

        try:
            return [Source("image", f, label) for f, label in labelled_files(path, class_map)]
        except DataError as e:
            return [Source("error", str(path), error=str(e).removeprefix(f"{path}: "))]
    wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in wanted and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        return [Source("error", str(path), error="empty folder: no image or video files in it (searched recursively)")]
    return [s for f in found for s in _file(Path(f))]


def _file(path: Path) -> list[Source]:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [Source("image", str(path))]
    if suffix in VIDEO_SUFFIXES:
        import cv2

        cap = cv2.VideoCapture(str(path))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if cap.isOpened() else 0
        cap.release()
        return [Source("video", str(path), count=max(1, frames))]
    if suffix == ".csv":
        from fer_ray.data.ingest import load_dataset

        try:
            data = load_dataset(path, fmt="csv")
        except DataError as e:
            return [Source("error", str(path), error=str(e).removeprefix(f"{path}: "))]
        return [Source("csv", str(path), count=len(data), data=data)]
    return [Source("error", str(path), error=f"not an image ({', '.join(sorted(IMAGE_SUFFIXES))}), a video "
                                            f"({', '.join(sorted(VIDEO_SUFFIXES))}) or a fer2013.csv")]


def plan_inputs(inputs: Iterable[str | Path], labels: bool = False, class_map: str | None = None,
                every_k: int = 1) -> list[Source]:
    """Every input path expanded into sources; problems (missing path, empty folder, unreadable CSV, an unknown
    class folder with ``labels``) become ``error`` sources, so they are rows of the output, not a crash."""
    out: list[Source] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            out.append(Source("error", str(path), error="not found"))
        elif path.is_dir():
            out += _folder(path, labels, class_map)
        else:
            out += _file(path)
    for s in out:
        if s.kind == "video":
            s.count = max(1, -(-s.count // every_k))
    return out


def iter_faces(sources: list[Source], mode: str, detector: FaceDetector | None, every_k: int,
               tick: Callable[[int], None]) -> Iterator[Face]:
    """The faces of every source, in order (see ``Face``)."""
    for s in sources:
        if s.kind == "error":
            yield Face(s.path, error=s.error, true_label=s.label)
        elif s.kind == "csv":
            for pixels, label, ident in zip(s.data.images, s.data.labels, s.data.ids):
                yield Face(f"{s.path}:{ident}", None, 0, (0, 0, IMG_SIZE, IMG_SIZE), pixels, true_label=int(label))
            tick(s.count)
        elif s.kind == "video":
            yield from video_faces(s.path, mode, detector, every_k, tick)
        else:
            try:
                blob = Path(s.path).read_bytes()
            except OSError as e:
                yield Face(s.path, error=f"cannot read ({e.strerror})", true_label=s.label)
            else:
                yield from image_faces(blob, mode, detector, s.path, s.label)
            tick(1)


class Progress:
    """A progress bar over ``total`` images/frames: tqdm on a terminal (when installed), else a line on stderr at
    every 10 %; nothing for short runs (``PROGRESS_MIN``)."""

    def __init__(self, total: int, enabled: bool = True, label: str = "predict") -> None:
        self.total, self.done, self.next_line, self.label, self.bar = total, 0, 0.1, label, None
        self.enabled = enabled and total >= PROGRESS_MIN
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", desc=label, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_line * self.total:
            print(f"[{self.label}] {self.done}/{self.total} images/frames ({100 * self.done / self.total:.0f} %)",
                  file=sys.stderr, flush=True)
            self.next_line = (int(10 * self.done / self.total) + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _row(f: Face, probs: np.ndarray | None) -> dict:
    row = {"source": f.source, "frame": f.frame, "face": f.face,
           **dict(zip("xywh", f.box if f.box else (None,) * 4)), "error": f.error}
    if probs is not None:
        row |= dict(zip(PROB_COLUMNS, probs.tolist()))
        row |= {"label": CLASSES[int(probs.argmax())], "confidence": float(probs.max())}
    if f.true_label is not None:
        row["true_label"] = CLASSES[f.true_label]
    return row


def score(bundle: Bundle, faces: Iterable[Face], batch: int = 256) -> pd.DataFrame:
    """One row per face (``COLUMNS``, plus ``true_label`` for labelled inputs), faces scored ``batch`` at a time."""
    rows: list[dict | None] = []
    pending: list[tuple[int, Face]] = []

    def flush() -> None:
        if pending:
            probs, _ = bundle.predict(np.stack([f.pixels for _, f in pending]), batch_size=batch)
            for (i, f), p in zip(pending, probs):
                rows[i] = _row(f, p)
            pending.clear()

    for f in faces:
        if f.pixels is None:
            rows.append(_row(f, None))
            continue
        pending.append((len(rows), f))
        rows.append(None)
        if len(pending) >= batch:
            flush()
    flush()
    df = pd.DataFrame(rows, columns=COLUMNS + (["true_label"] if any("true_label" in r for r in rows) else []))
    for col in ("frame", "face", "x", "y", "w", "h"):
        df[col] = df[col].astype("Int64")
    return df


def predict(bundle: Bundle, inputs: Iterable[str | Path], faces: str = "detect", batch: int = 256, every_k: int = 1,
            labels: bool = False, class_map: str | None = None, margin: float = MARGIN,
            progress: bool = True) -> pd.DataFrame:
    """Run ``bundle`` on ``inputs`` (image files, folders, fer2013.csv files, videos); one row per face.

    Args:
        bundle: A loaded bundle (``fer_ray.bundle.load_bundle``).
        inputs: Paths; see the module docstring.
        faces: ``detect`` (OpenCV Haar cascade, crop with ``margin``) or ``whole`` (each image is one face).
            A fer2013.csv's rows are faces already.
        batch: Faces per forward pass.
        every_k: Videos: score every k-th frame.
        labels: Read folders as labelled datasets (``train/<class>/`` or ``<class>/``): rows get ``true_label``.
        class_map: With ``labels``: class-folder renames and drops (``anger=angry,contempt=drop``, ``rafdb``).
        margin: ``detect``: share of the box added on each side.
        progress: Show progress on long inputs.

    Returns:
        The rows (``COLUMNS`` [+ ``true_label``]), in input order.
    """
    if faces not in FACE_MODES:
        raise ConfigError(f"--faces: one of {', '.join(FACE_MODES)}, got {faces!r}")
    if every_k < 1 or batch < 1:
        raise ConfigError(f"--every-k and --batch must be >= 1, got {every_k} and {batch}")
    detector = FaceDetector(margin) if faces == "detect" else None
    sources = plan_inputs(inputs, labels, class_map, every_k)
    bar = Progress(sum(s.count for s in sources), progress)
    try:
        return score(bundle, iter_faces(sources, faces, detector, every_k, bar), batch)
    finally:
        bar.close()


def write_predictions(df: pd.DataFrame, out: str | Path) -> Path:
    """Write the rows as CSV or Parquet, by ``out``'s suffix."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False) if out.suffix.lower() == ".parquet" else df.to_csv(out, index=False)
    return out


def check_out(out: str | Path) -> None:
    if Path(out).suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out {out}: the file name must end in {' or '.join(OUT_SUFFIXES)}")


def summarize(df: pd.DataFrame, seconds: float | None = None) -> list[str]:
    """Lines for people: counts, errors by kind, speed; with labels, accuracy, macro-F1, per-class recall and the
    confusion matrix of the scored faces."""
    scored = df[df.error.isna()]
    errors = df.error.dropna().map(lambda e: e.split(" (")[0].split(":")[0])
    kinds = ", ".join(f"{n} {k}" for k, n in errors.value_counts().items())
    speed = f" in {seconds:.1f}s ({len(scored) / max(seconds, 1e-9):.0f} faces/s)" if seconds else ""
    lines = [f"{len(scored)} faces scored, {len(df) - len(scored)} rows with errors{f' ({kinds})' if kinds else ''}"
             f"{speed}"]
    if len(scored):
        lines.append("predicted: " + ", ".join(f"{c} {n}" for c, n in scored.label.value_counts().items()))
    if "true_label" in df and scored.true_label.notna().any():
        from fer_ray.metrics import classification_metrics

        lab = scored[scored.true_label.notna()]
        y = lab.true_label.map(CLASSES.index).to_numpy()
        probs = lab[PROB_COLUMNS].to_numpy(np.float64)
        m = classification_metrics(probs / probs.sum(1, keepdims=True), y, from_logits=False, num_classes=len(CLASSES))
        present = np.bincount(y, minlength=len(CLASSES)) > 0
        recall = ", ".join(f"{c} {r:.3f}" if ok else f"{c} n/a" for c, r, ok in
                           zip(CLASSES, m["per_class_recall"], present))
        lines += [f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on {len(lab)} labelled faces",
                  f"per-class recall: {recall}", "confusion (rows: true, columns: predicted):",
                  pd.DataFrame(m["confusion"], index=CLASSES, columns=CLASSES).to_string()]
    return lines


def run_cli(bundle: str, inputs: list[str], out: str | None, threads: int | None = None, **kw) -> pd.DataFrame:
    """``fer-ray predict``: load the bundle (its folder or URI: ``fer_ray.bundle.load_bundle``), run, write (``out``,
    or CSV on stdout) and summarise."""
    from fer_ray.bundle import load_bundle

    if out:
        check_out(out)
    loaded = load_bundle(bundle, threads=threads)
    t0 = time.perf_counter()
    df = predict(loaded, inputs, **kw)
    seconds = time.perf_counter() - t0
    stream = sys.stderr if out is None else sys.stdout
    if out is None:
        df.to_csv(sys.stdout, index=False)
    else:
        print(f"wrote {write_predictions(df, out)} ({len(df)} rows)")
    for line in summarize(df, seconds):
        print(line, file=stream)
    return df
