"""Leaderboard and report: every number recomputed from the logit store, written as CSV, Markdown and HTML.

``leaderboard`` has one row per model (each trial's TTA views averaged) and per ensemble, with fixed
columns (see ``COLUMNS``) plus accuracy, macro-F1, NLL, ECE and Brier per split and the split each entry was
selected on. Efficiency is report-split accuracy in % per total GFLOPs, where GFLOPs = 2 × GMACs (fvcore counts
a multiply-add once). ``write_report`` adds a self-contained HTML page, headed by each split's role, with plots:
accuracy vs GMACs with the Pareto front, the budget-search Pareto front (``pareto.csv``) with report accuracy
annotated, reliability diagrams of the best ensemble before/after temperature scaling, the confusion matrix and
per-class recall (on the first report split and on every external dataset ``fer-ray evaluate`` added), and ASHA's
trial curves. The page's leaderboard shows the key columns (``key_columns``) in one table that fits a 1400-px
window; every other column sits in a second table behind a ``<details>`` toggle (``scripts/screenshot_report.py``
checks the fit in headless Chromium). A run with a time limit adds its budget line (``fer_ray.budget.summary_line``)
above the leaderboard and a ``budget_cut`` column (an entry the limit stopped early, or with such a member).
"""

from __future__ import annotations

import json
from html import escape as html_escape

import numpy as np
import pandas as pd

from fer_ray.budget import summary_line
from fer_ray.data import CLASSES
from fer_ray.ensemble import fit_temperature, member_logits, pareto_front, stale_reason
from fer_ray.experiment import Experiment, as_experiment
from fer_ray.figures import data_uri, png_bytes, pyplot
from fer_ray.metrics import classification_metrics, reliability_curve, softmax
from fer_ray.names import SPLIT_ROLES, SPLITS
from fer_ray.store import load_store

COLUMNS = ["name", "kind", "members", "arch", "img_size", "tta_views", "params", "gmacs", "total_gmacs", "combiner",
           "selected_on"]
SPLIT_ORDER = [s for s in SPLITS if SPLIT_ROLES[s] != "fit"]


def _report_split(roles: dict[str, str]) -> str | None:
    return next((s for s in SPLIT_ORDER if roles.get(s) == "report"), None)


def split_order(roles: dict[str, str]) -> list[str]:
    """Scored splits in leaderboard order: ``SPLIT_ORDER``, then other non-fit splits (``fer-ray evaluate``)."""
    return [s for s in SPLIT_ORDER if s in roles] + [s for s, r in roles.items() if s not in SPLIT_ORDER and r != "fit"]


def member_table(exp: Experiment | str) -> pd.DataFrame:
    """Every scoreable member (``Experiment.members``): trials, the checkpoint library, distilled students."""
    return as_experiment(exp).members()


def leaderboard(exp: Experiment | str) -> pd.DataFrame:
    """One row per stored model and ensemble, metrics per split, ranked by the out-of-fold selection-split accuracy
    (``oof_acc_<select>``): an ensemble's estimate with its members and fitted numbers chosen on other folds
    (``fer_ray.ensemble.out_of_fold``), a model's own selection-split accuracy (nothing is fitted on it). The
    in-sample ``acc_<select>`` sits beside it: ranked on that, a fitted ensemble would win by construction."""
    exp = as_experiment(exp)
    roles = exp.roles()
    select = next(s for s, r in roles.items() if r == "select")
    trials = member_table(exp)
    store = load_store(exp)
    cut = "budget_cut" in trials.columns and exp.budget() is not None  # a time limit: say which entries it cut
    rows = []
    for member, per_split in store.items():
        any_set = next(iter(per_split.values()))
        if member.startswith("ensemble:"):
            info = exp.ensemble(member.split(":", 1)[1])
            reason = stale_reason(info, store)
            if reason:
                print(f"[report] left out stale ensemble {info['name']} ({reason}): rebuild it with "
                      "`fer-ray ensemble`", flush=True)
                continue
            t = trials.loc[info["members"]]
            row = {"name": info["name"], "kind": "ensemble", "members": " ".join(info["members"]),
                   "arch": "+".join(sorted(set(t.arch))), "img_size": "/".join(str(s) for s in sorted(set(t.img_size))),
                   "tta_views": len(info["views"]), "params": int(t.params.sum()), "gmacs": float(t.gmacs.sum()),
                   "total_gmacs": info["total_gmacs"], "combiner": info["combiner"] + (
                       "+T" if info.get("fitted", {}).get("temperature") else ""),
                   "selected_on": info.get("selected_on", select)}
            if cut:
                row["budget_cut"] = bool(t.budget_cut.eq(True).any())
        else:
            t = trials.loc[member]
            row = {"name": member, "kind": t.kind, "members": member, "arch": t.arch, "img_size": str(t.img_size),
                   "tta_views": len(any_set.views), "params": int(t.params), "gmacs": float(t.gmacs),
                   "total_gmacs": float(t.gmacs) * len(any_set.views), "combiner": "", "selected_on": select}
            if cut:
                row["budget_cut"] = t.get("budget_cut") in (True, 1)  # NaN (a distilled student): no
            if isinstance(t.get("mutations"), str) and t.get("mutations") != "[]":  # population-based training
                row["mutations"] = mutation_schedule(json.loads(t.mutations))
        for split in split_order(roles):
            if split in per_split:
                m = classification_metrics(member_logits(per_split[split], None), per_split[split].labels)
                row |= {f"acc_{split}": m["accuracy"], f"macro_f1_{split}": m["macro_f1"], f"nll_{split}": m["nll"],
                        f"ece_{split}": m["ece"], f"brier_{split}": m["brier"]}
        if row["kind"] == "ensemble":
            row[f"oof_acc_{select}"] = (info.get("oof") or {}).get("accuracy", np.nan)
        else:
            row[f"oof_acc_{select}"] = row.get(f"acc_{select}", np.nan)
        rep = _report_split(roles)
        row["efficiency"] = 100 * row.get(f"acc_{rep}", np.nan) / (2 * row["total_gmacs"]) if rep else np.nan
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    return board.sort_values([f"oof_acc_{select}", f"acc_{select}"], ascending=False,
                             na_position="last").reset_index(drop=True)


def mutation_schedule(mutations: list[dict]) -> str:
    """A PBT trial's exploit steps in one cell: ``e2<-t01 lr=0.0012; e4<-t03 lr=0.00096``."""
    return "; ".join(f"e{m['epoch']}<-{m['from']} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                                for k, v in m["config"].items()) for m in mutations)


def key_columns(board: pd.DataFrame, roles: dict[str, str]) -> list[str]:
    """The leaderboard columns the HTML report shows first, in order: what an entry is and costs, its out-of-fold and
    in-sample accuracy on the selection split, accuracy and macro-F1 on the first report split. The rest of the
    columns go behind the page's toggle."""
    select, report = next(s for s, r in roles.items() if r == "select"), _report_split(roles)
    cols = ["name", "kind", "arch", "img_size", "tta_views", "total_gmacs", f"oof_acc_{select}", f"acc_{select}"]
    cols += [f"acc_{report}", f"macro_f1_{report}"] if report else []
    return [c for c in cols if c in board.columns]


def _html_tables(board: pd.DataFrame, roles: dict[str, str]) -> list[str]:
    """The leaderboard as HTML: the key columns in ``table#leaderboard``, then ``details#all-columns`` holding
    ``name`` and every other column in ``table#leaderboard-rest``, inside a box that scrolls on its own."""
    if board.empty:
        return ["<p>(empty leaderboard)</p>"]
    key = key_columns(board, roles)
    rest = [c for c in board.columns if c not in key]
    fmt = {"index": False, "float_format": lambda x: f"{x:.4f}", "border": 0, "na_rep": ""}
    select = next(s for s, r in roles.items() if r == "select")
    html = ["<h2>Leaderboard</h2>",
            f"<p>Ranked by <code>oof_acc_{select}</code> (out-of-fold for fitted ensembles, plain {select} accuracy "
            "for single models), then the in-sample figure. Every column is in <code>leaderboard.csv</code>.</p>",
            board[key].to_html(table_id="leaderboard", classes="key", **fmt)]
    if rest:
        html += [f"<details id='all-columns'><summary>The other {len(rest)} columns: "
                 f"{', '.join(rest[:6])}{', …' if len(rest) > 6 else ''}</summary><div class='wide'>",
                 board[["name", *rest]].to_html(table_id="leaderboard-rest", classes="rest", **fmt),
                 "</div></details>"]
    return html


def format_table(board: pd.DataFrame) -> str:
    """Compact terminal table."""
    if board.empty:
        return "(empty leaderboard)"
    cols = ["name", "kind", "arch", "img_size", "tta_views", "params", "total_gmacs"]
    cols += [c for c in board.columns if c.startswith(("oof_acc_", "acc_")) or c.startswith("macro_f1_public")]
    cols += [c for c in board.columns if c.startswith(("nll_public", "ece_public"))] + ["efficiency"]
    view = board[cols].copy()
    view["params"] = (view["params"] / 1e6).map("{:.2f}M".format)
    view["arch"] = view["arch"].str.slice(0, 40)
    return view.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def _png(fig) -> str:
    return data_uri(png_bytes(fig))


def _pareto_figure(exp: Experiment, plt, select: str, report: str | None):
    """Budget-search candidates and their Pareto front; front points annotated with report accuracy."""
    cand = exp.pareto()
    if cand is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, (views, sub) in enumerate(cand.groupby("views", sort=False)):
        ax.scatter(sub.gmacs, sub.select_acc, s=14, alpha=0.5, color=f"C{i}", label=f"candidates [{views}]")
    front = cand[cand.on_front].sort_values("gmacs")
    ax.step(front.gmacs, front.select_acc, where="post", color="k", lw=1.2, marker="o", ms=4,
            label=f"Pareto front ({select})")
    col = f"acc_{report}" if report else None
    if col in cand.columns:
        last = -np.inf
        for gm, acc, rep in front[["gmacs", "select_acc", col]].itertuples(index=False):
            if np.isfinite(rep) and np.log10(gm) - last > 0.05:  # skip labels that would overlap
                last = np.log10(gm)
                ax.annotate(f"{rep:.3f}", (gm, acc), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color="C3")
    if "chosen" in cand.columns and cand.chosen.any():
        ch = cand[cand.chosen]
        ax.scatter(ch.gmacs, ch.select_acc, marker="*", s=220, color="gold", edgecolors="k", zorder=5,
                   label="chosen under budget")
    if "budget_gmacs" in cand.columns:
        ax.axvline(cand.budget_gmacs.iloc[0], color="grey", ls=":", lw=1, label="budget")
    ax.set_xscale("log")
    note = f"; red: {report} accuracy, computed after selection" if col in cand.columns else ""
    ax.set(xlabel="GMACs per image (Σ members × views, log)", ylabel=f"{select} accuracy",
           title=f"Budget search (selected on {select}{note})")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    return fig


def _reliability_figure(exp: Experiment, board: pd.DataFrame, plt, select: str, report: str | None):
    """Reliability diagrams of the best ensemble, without and with a temperature fitted on ``select``."""
    ens = board[board.kind == "ensemble"]
    if ens.empty:
        return None
    name = ens.iloc[0]["name"]
    info = exp.ensemble(name)
    sets = load_store(exp, [s for s in (select, report) if s]).get(f"ensemble:{name}", {})
    if select not in sets:
        return None
    stored_t = (info.get("fitted") or {}).get("temperature") or 1.0  # undo a fitted final temperature
    raw = {s: member_logits(ls, None).astype(np.float64) * stored_t for s, ls in sets.items()}
    t = fit_temperature(raw[select], sets[select].labels)
    shown = report if report in sets else select
    labels = sets[shown].labels
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    for ax, (what, logits) in zip(axes, (("before", raw[shown]), (f"after T = {t:.2f} (fitted on {select})",
                                                                   raw[shown] / t))):
        probs = softmax(logits)
        rc = reliability_curve(probs, labels)
        m = classification_metrics(logits, labels)
        centers = (rc["edges"][:-1] + rc["edges"][1:]) / 2
        ax.bar(centers, np.nan_to_num(rc["accuracy"]), width=1 / len(centers), edgecolor="k", alpha=0.7,
               label="accuracy per bin")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
               title=f"{name} on {shown}, {what}\nECE {m['ece']:.3f}  NLL {m['nll']:.3f}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper left")
    return fig


def _confusion_figure(exp: Experiment, board: pd.DataFrame, plt, split: str):
    """Row-normalised confusion matrix and per-class recall of the leaderboard's best entry on ``split`` (``None`` if
    it has no logits there); classes the split has no image of show no recall bar (marked n/a), not a zero."""
    best = board.iloc[0]
    ls = load_store(exp, [split]).get(("ensemble:" + best["name"]) if best.kind == "ensemble" else best["name"], {})
    if split not in ls:
        return None
    m = classification_metrics(member_logits(ls[split], None), ls[split].labels, num_classes=len(CLASSES))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    counts = np.array(m["confusion"], dtype=float)
    cm = counts / counts.sum(1, keepdims=True).clip(min=1)
    a1.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    a1.set(xticks=range(7), yticks=range(7), xticklabels=CLASSES, yticklabels=CLASSES, xlabel="predicted",
           ylabel="true", title=f"{best['name']} on {split}\n(row-normalised; n = {len(ls[split].labels)})")
    a1.title.set_fontsize(9)
    a1.tick_params(axis="x", rotation=45)
    for i in range(7):
        for j in range(7):
            a1.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7)
    present = counts.sum(1) > 0
    recall = np.where(present, m["per_class_recall"], 0.0)
    bars = a2.bar(CLASSES, recall)
    for bar, r, ok, n in zip(bars, recall, present, counts.sum(1)):
        a2.annotate(f"{r:.2f}\n(n={int(n)})" if ok else "n/a", (bar.get_x() + bar.get_width() / 2, r),
                    ha="center", va="bottom", fontsize=7)
    a2.set(ylim=(0, 1.15), title=f"per-class recall on {split}\n(n/a: no image of that class)")
    a2.title.set_fontsize(9)
    a2.tick_params(axis="x", rotation=45)
    return fig


def _plots(exp: Experiment, board: pd.DataFrame, roles: dict[str, str]) -> dict[str, str]:
    plt = pyplot()

    select, report = next(s for s, r in roles.items() if r == "select"), _report_split(roles)
    figs = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, marker in (("model", "o"), ("snapshot", "s"), ("ema", "^"), ("distill", "D"), ("ensemble", "*")):
        sub = board[board.kind == kind]
        if sub.empty:
            continue
        ax.scatter(sub.total_gmacs, sub[f"acc_{select}"], marker=marker, s=60 if kind != "ensemble" else 160,
                   label=f"{kind} ({select})")
        if report:
            ax.scatter(sub.total_gmacs, sub[f"acc_{report}"], marker=marker, facecolors="none", edgecolors="grey",
                       s=60 if kind != "ensemble" else 160, label=f"{kind} ({report})")
    pts = board[["total_gmacs", f"acc_{select}"]].to_numpy(dtype=float)
    front = pts[pareto_front(pts)]  # the one Pareto rule, shared with ``fer_ray.ensemble.budget_search``
    ax.step(front[:, 0], front[:, 1], where="post", color="C3", lw=1, label=f"Pareto front ({select})")
    ax.set_xscale("log")
    ax.set(xlabel="total GMACs per image (log)", ylabel="accuracy", title="Accuracy vs compute")
    ax.legend(fontsize=7)
    figs["Accuracy vs GMACs"] = _png(fig)

    external = [s for s in split_order(roles) if roles[s] == "report" and s not in SPLIT_ORDER]
    for split in ([report] if report else []) + external:  # every dataset scored by `fer-ray evaluate` too
        fig = _confusion_figure(exp, board, plt, split)
        if fig is not None:
            figs["Best entry: confusion and recall" if split == report else
                 f"Best entry on {split} (external dataset): confusion and per-class recall"] = _png(fig)

    for title, fig in (("Budget search: Pareto front", _pareto_figure(exp, plt, select, report)),
                       ("Best ensemble: reliability before/after temperature scaling",
                        _reliability_figure(exp, board, plt, select, report))):
        if fig is not None:
            figs[title] = _png(fig)

    trials = exp.trials()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in trials.itertuples():
        h = exp.metrics(row.trial_id)
        if h is not None:
            ax.plot(h.epoch, h.val_acc, marker="o", color="lightgrey" if row.stopped_early else None,
                    label=None if row.stopped_early else f"{row.trial_id} {row.arch}@{row.img_size}")
    ax.set(xlabel="epoch", ylabel=f"{select} accuracy", title="ASHA trial curves (grey: stopped early)")
    if ax.get_legend_handles_labels()[1]:  # every trial stopped early or no curves: nothing to name
        ax.legend(fontsize=6)
    figs["Trial curves"] = _png(fig)
    return figs


def write_report(exp: Experiment | str, out: str | None = None, board: pd.DataFrame | None = None) -> dict[str, str]:
    """Write ``leaderboard.csv``, ``leaderboard.md`` and a self-contained ``report.html`` into ``out`` (a path or
    URI; default ``<experiment>/report``); return their locations. ``board``: ``leaderboard(exp)`` if already made."""
    exp = as_experiment(exp)
    folder = exp.report_storage(out)
    roles = exp.roles()
    board = leaderboard(exp) if board is None else board
    role_line = "Split roles: " + ", ".join(f"{s} = {r}" for s, r in roles.items())
    info = exp.budget()
    budget_line = summary_line(info) if info and "plan" in info else ""
    head = f"{role_line}\n\n" + (f"Time budget: {budget_line}\n\n" if budget_line else "")
    markdown = head + board.to_markdown(index=False, floatfmt=".4f") + "\n"
    paths = {"csv": folder.write_text("leaderboard.csv", board.to_csv(index=False)),
             "md": folder.write_text("leaderboard.md", markdown)}
    figs = _plots(exp, board, roles) if not board.empty else {}
    html = ["<!doctype html><html><head><meta charset='utf-8'><title>fer_ray report</title>",
            "<meta name='viewport' content='width=device-width'>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px}td{text-align:right}"
            "table.key td:nth-child(-n+3){text-align:left;overflow-wrap:anywhere}"
            "table.rest td:first-child{text-align:left;white-space:nowrap}table.rest td:nth-child(2){text-align:left;"
            "min-width:8em}"
            "details{margin:1em 0}summary{cursor:pointer}.wide{max-width:100%;overflow-x:auto}"
            "img{max-width:100%;height:auto}</style></head><body>",
            f"<h1>fer_ray report: {exp.name}</h1><p><b>{role_line}</b>. Selection and ensemble fitting used only the "
            "select split. Efficiency = report accuracy % / (2 × total GMACs).</p>",
            *([f"<p id='budget'><b>Time budget</b>: {html_escape(budget_line)} (<code>budget.json</code>; "
               "<code>budget_cut</code>: stopped early by the time limit, ranked on its completed epochs).</p>"]
              if budget_line else []),
            *_html_tables(board, roles)]
    html += [f"<h2>{title}</h2><img src='{uri}'/>" for title, uri in figs.items()]
    paths["html"] = folder.write_text("report.html", "\n".join(html) + "</body></html>\n")
    return paths
