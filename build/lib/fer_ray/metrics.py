"""Classification metrics for models and ensembles: scikit-learn where it has them, ECE/Brier in numpy.

``classification_metrics`` returns accuracy, macro-F1, per-class recall, one-vs-rest macro AUROC, NLL,
ECE (15 equal-width bins over the top probability), multi-class Brier score and the confusion matrix;
``reliability_curve`` gives the per-bin numbers behind ECE for reliability diagrams.
"""

from __future__ import annotations

import numpy as np
import scipy.special
from sklearn.metrics import confusion_matrix, f1_score, log_loss, recall_score, roc_auc_score


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """``scipy.special.softmax`` over the class axis (scipy's default, ``axis=None``, would normalise everything)."""
    return scipy.special.softmax(logits, axis=axis)


def _calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width bin of top probability: summed correctness, summed confidence, count."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    return (np.bincount(bins, weights=correct, minlength=n_bins), np.bincount(bins, weights=conf, minlength=n_bins),
            np.bincount(bins, minlength=n_bins))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: Σ_bins |accuracy − confidence| weighted by the bin's share of images."""
    acc, cs, _ = _calibration_bins(probs, labels, n_bins)
    return float(np.abs(acc - cs).sum() / max(len(labels), 1))


def reliability_curve(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability diagram data: bin edges, mean confidence, accuracy and count per bin (NaN where empty)."""
    acc, cs, count = _calibration_bins(probs, labels, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": np.linspace(0, 1, n_bins + 1), "confidence": cs / count, "accuracy": acc / count,
                "count": count}


def classification_metrics(scores: np.ndarray, labels: np.ndarray, from_logits: bool = True,
                           num_classes: int | None = None) -> dict:
    """Metrics of ``[N, C]`` logits (or probabilities with ``from_logits=False``) against integer labels."""
    probs = softmax(scores) if from_logits else np.asarray(scores, dtype=np.float64)
    c = num_classes or probs.shape[1]
    classes = list(range(c))
    pred = probs.argmax(1)
    present = np.unique(labels)
    try:
        auroc = float(roc_auc_score(labels, probs[:, present] / probs[:, present].sum(1, keepdims=True),
                                    multi_class="ovr", labels=present)) if len(present) > 2 else float("nan")
    except ValueError:
        auroc = float("nan")
    onehot = np.eye(c)[labels]
    return {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1_score(labels, pred, labels=classes, average="macro", zero_division=0)),
        "per_class_recall": recall_score(labels, pred, labels=classes, average=None, zero_division=0).tolist(),
        "auroc": auroc,
        "nll": float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=classes)),
        "ece": expected_calibration_error(probs, labels),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
        "confusion": confusion_matrix(labels, pred, labels=classes).tolist(),
    }
