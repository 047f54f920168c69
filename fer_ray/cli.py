"""The ``fer-ray`` command: one subcommand per pipeline stage, each a thin call into the package.

``fer-ray demo`` runs everything on the synthetic set; ``sweep`` runs a sweep file end to end (or resumes
one); ``train`` runs one Ray Train job; ``tta``, ``ensemble`` and ``report`` re-run later stages on an
existing experiment folder; ``evaluate`` scores it on another dataset; ``distill`` trains a student of one of
its ensembles; ``models``/``flops`` inspect the registry; ``data`` writes or summarises data.
Every ``RESULTS`` argument and ``--out`` take a local path or a storage URI (``s3://bucket/prefix?...``, ``gs://``:
``fer_ray.storage``). Bad input exits with status 2 and one line naming the file or field.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from fer_ray.checkpoint import CheckpointError
from fer_ray.config import ConfigError, DataConfig, SweepConfig, TrainConfig, load_sweep, load_yaml
from fer_ray.data import DataError
from fer_ray.experiment import Experiment
from fer_ray.names import FORMATS
from fer_ray.storage import StorageError
from fer_ray.store import StoreError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _sweep_file(name: str) -> Path:
    p = Path(name)
    if not p.exists() and (REPO_ROOT / "sweeps" / p).exists():
        p = REPO_ROOT / "sweeps" / p
    return p


def _apply_overrides(cfg: SweepConfig, args) -> SweepConfig:
    train = cfg.train.to_dict()
    if args.workers_per_trial is not None:
        train["num_workers"] = args.workers_per_trial
    if args.gpus_per_trial and args.gpus_per_trial < 1:  # a share of one GPU: an in-process trial by default
        train.update(use_gpu=True, gpu_fraction=args.gpus_per_trial, num_workers=args.workers_per_trial or 0)
    elif args.gpus_per_trial:
        if args.gpus_per_trial != int(args.gpus_per_trial):
            raise ConfigError(f"--gpus-per-trial: a whole number of GPUs, or a fraction below 1 of one GPU; "
                              f"got {args.gpus_per_trial}")
        train.update(use_gpu=True, gpu_fraction=1.0,
                     num_workers=args.workers_per_trial or int(args.gpus_per_trial))
    data = cfg.data.to_dict()
    if args.data:
        data["path"] = args.data
    raw = cfg.to_dict() | {"train": train, "data": data}
    if getattr(args, "wandb", False):
        raw["wandb"] = True
    if args.name:
        raw["name"] = args.name
    return SweepConfig.from_dict(raw, "sweep")


def cmd_sweep(args) -> None:
    from fer_ray.models import check_model_names
    from fer_ray.pipeline import run_all

    if args.resume:
        exp = Experiment(args.resume)
        cfg = exp.sweep()
    else:
        cfg = _apply_overrides(load_sweep(_sweep_file(args.sweep)), args)
        check_model_names(cfg)
        exp = _new_experiment(args.out, cfg.name, args.overwrite)
    run_all(cfg, exp, resume=bool(args.resume), num_cpus=args.num_cpus, sweep_only=args.sweep_only)


def _new_experiment(out: str, name: str, overwrite: bool) -> Experiment:
    """The experiment ``name`` under ``out``; one that already holds trials is refused, or with ``overwrite`` removed
    (a new sweep must not mix its trials with an old one's)."""
    exp = Experiment.under(out, name)
    if exp.dirs("trials") or exp.is_file("trials.parquet"):
        if not overwrite:
            raise ConfigError(f"{exp.uri} already holds a sweep: continue it with --resume {exp.uri}, choose "
                              f"another --name or --out, or replace it with --overwrite")
        exp.delete("")
    return exp


def cmd_demo(args) -> None:
    args.sweep, args.resume = args.sweep or "demo.yaml", None
    args.name = args.data = args.workers_per_trial = args.gpus_per_trial = None
    args.sweep_only, args.wandb, args.overwrite = False, False, True
    from fer_ray.storage import parent_and_name

    args.out, args.name = parent_and_name(args.out)
    cmd_sweep(args)


def cmd_train(args) -> None:
    """One run: a one-trial sweep (so it checkpoints, retries and resumes exactly as sweep trials do)."""
    from fer_ray.sweep import run_sweep

    raw = load_yaml(args.config) if args.config else {}
    train = raw.get("train", {}) | {k: v for k, v in {
        "model": args.model, "epochs": args.epochs, "img_size": args.img_size, "batch_size": args.batch_size,
        "lr": args.lr, "num_workers": args.workers, "use_gpu": args.gpu or None}.items() if v is not None}
    data = raw.get("data", {}) | ({"path": args.data} if args.data else {})
    epochs = train.get("epochs", TrainConfig().epochs)
    cfg = SweepConfig.from_dict({"name": args.name or time.strftime("train_%Y%m%d_%H%M%S"), "data": data,
                                 "train": train, "num_samples": 1, "asha": {"max_t": epochs, "grace_period": epochs},
                                 "placement": raw.get("placement", {})}, "train")
    exp = _new_experiment(args.out, cfg.name, args.overwrite)
    trials = run_sweep(cfg, exp, num_cpus=args.num_cpus)
    print(trials.drop(columns=["config"]).to_string(index=False))


def cmd_tta(args) -> None:
    from fer_ray.pipeline import tta_stage

    exp = Experiment(args.results_dir)
    paths = tta_stage(exp, args.views)
    print(f"{len(paths)} logit files under {exp.uri_of('logits')}")


def cmd_ensemble(args) -> None:
    from fer_ray.ensemble import EnsembleSpec, ProtocolError, budget_search, run_ensemble
    from fer_ray.pipeline import ensemble_stage

    exp = Experiment(args.results_dir)
    try:
        if args.spec:
            spec_path = Path(args.spec)
            if not spec_path.exists() and (REPO_ROOT / "ensembles" / spec_path).exists():
                spec_path = REPO_ROOT / "ensembles" / spec_path
            raw = load_yaml(spec_path)
            raw.setdefault("name", spec_path.stem)
            if args.budget_gmacs is not None:
                raw["budget_gmacs"] = args.budget_gmacs
            out = run_ensemble(exp, EnsembleSpec.from_dict(raw, str(spec_path)))
        elif args.budget_gmacs is not None:
            out = budget_search(exp, args.budget_gmacs, args.select_split)
            print(f"candidates and Pareto front: {exp.uri_of('pareto.csv')}")
        else:
            out = ensemble_stage(exp, args.top_k, args.combiner)
    except ProtocolError as e:
        raise ConfigError(str(e)) from None
    print(json.dumps(out, indent=1, default=str)[:4000])


def cmd_evaluate(args) -> None:
    from fer_ray.evaluate import evaluate_external
    from fer_ray.report import format_table

    board = evaluate_external(args.results_dir, args.data, name=args.name, fmt=args.format)
    print(format_table(board))


def cmd_distill(args) -> None:
    from fer_ray.distill import distill

    row = distill(args.results_dir, args.ensemble, args.student, epochs=args.epochs,
                  temperature=args.temperature, alpha=args.alpha, img_size=args.img_size, name=args.name,
                  num_workers=args.workers, batch_size=args.batch_size, lr=args.lr, num_cpus=args.num_cpus)
    print(row.to_string())


def cmd_report(args) -> None:
    from fer_ray.pipeline import report_stage
    from fer_ray.report import format_table

    board = report_stage(args.results_dir, args.out)
    print(format_table(board))


def cmd_models(args) -> None:
    from fer_ray.models import list_models, model_cfg

    for name in list_models(args.pattern):
        c = model_cfg(name)
        print(f"{name:32s} {c.in_chans}×{c.img_size}×{c.img_size}  {c.description}")
    print("timm/<name>                      any timm model (e.g. timm/efficientnet_b0)")


def cmd_flops(args) -> None:
    from fer_ray.flops import model_profile

    print(json.dumps(model_profile(args.model, img_size=args.img_size), indent=1))


def _data_quality(args) -> None:
    """``data check`` / ``data report``: duplicate audit (and EDA report) of one dataset."""
    from fer_ray.data import load_data
    from fer_ray.data.quality import check, summarize

    cfg = DataConfig(path=args.path, format=args.format, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    t0 = time.perf_counter()
    data = load_data(cfg)
    t1 = time.perf_counter()
    groups = check(data, threshold=args.threshold)
    t2 = time.perf_counter()
    print(f"{args.path}: {len(data)} images (load {t1 - t0:.1f}s, check {t2 - t1:.1f}s)")
    for key, value in summarize(groups).items():
        print(f"  {key:24s} {value}")
    if args.data_cmd == "check" and args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        groups.to_csv(out, index=False) if out.suffix == ".csv" else groups.to_parquet(out, index=False)
        print(f"wrote {out} ({len(groups)} rows)")
    if args.data_cmd == "report":
        from fer_ray.data.eda import write_eda

        paths = write_eda(data, args.out, check_df=groups)
        print(f"wrote {paths['html']} ({time.perf_counter() - t2:.1f}s)")


def cmd_data(args) -> None:
    if args.data_cmd in ("check", "report"):
        _data_quality(args)
        return
    if args.data_cmd == "synth":
        from fer_ray.data import synthetic

        data = synthetic.generate(args.n, seed=args.seed)
        path = synthetic.write_csv(Path(args.out) / "fer2013.csv", data)
        print(f"wrote {path} ({len(data)} images)")
        return
    from fer_ray.data import USAGES, load_data

    data = load_data(DataConfig(path=args.path, format=args.format, on_bad_row=args.on_bad_row))
    print(f"{args.path}: {len(data)} images")
    for u, name in enumerate(USAGES):
        mask = data.usage == u
        if mask.any():
            print(f"  {name:12s} {int(mask.sum()):6d}  per class {data.class_counts(name).tolist()}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fer-ray", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def sweep_opts(sp):
        sp.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all); ignored with RAY_ADDRESS")
        sp.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (0 = Ray Train local mode)")
        sp.add_argument("--gpus-per-trial", type=float,
                        help="GPUs per trial: N whole GPUs (one per DDP worker), or a share of one below 1 "
                             "(0.25 packs four small trials on a GPU)")
        sp.add_argument("--data", help="dataset path (csv, image folders, torchvision layout); default synthetic")
        sp.add_argument("--name", help="experiment name (default: the sweep's name)")

    s = sub.add_parser("sweep", help="run a sweep file: ASHA sweep → TTA → ensemble → leaderboard")
    s.add_argument("sweep", nargs="?", help="sweeps/<file>.yaml (or a bare file name inside sweeps/)")
    s.add_argument("--out", default="results",
                   help="results root: a path or a URI such as s3://bucket/prefix (default: results)")
    s.add_argument("--resume", metavar="RESULTS_DIR", help="continue an interrupted sweep in this experiment folder")
    s.add_argument("--sweep-only", action="store_true", help="stop after the sweep (no TTA/ensemble/report)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing experiment folder of the same name (default: refuse)")
    s.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)")
    sweep_opts(s)
    s.set_defaults(func=cmd_sweep)

    d = sub.add_parser("demo", help="the whole pipeline on the synthetic dataset (sweeps/demo.yaml)")
    d.add_argument("--out", default="results/demo",
                   help="experiment folder, replaced if it exists (default: results/demo)")
    d.add_argument("--sweep", help="sweep file (default: sweeps/demo.yaml)")
    d.add_argument("--num-cpus", type=int)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="one Ray Train (DDP) run of one model")
    t.add_argument("--model", help="registry name or timm/<name> (see `fer-ray models`)")
    t.add_argument("--config", help="YAML with optional `data:` and `train:` sections")
    t.add_argument("--data", help="dataset path; default synthetic")
    t.add_argument("--epochs", type=int)
    t.add_argument("--img-size", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--workers", type=int, help="DDP workers (0 = in-process local mode)")
    t.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl, AMP on tensor-core GPUs)")
    t.add_argument("--num-cpus", type=int)
    t.add_argument("--name", help="experiment name under --out (default: train_<date>_<time>)")
    t.add_argument("--out", default="results", help="results root: a path or a URI such as s3://bucket/prefix")
    t.add_argument("--overwrite", action="store_true", help="replace an existing experiment of the same name")
    t.set_defaults(func=cmd_train)

    tt = sub.add_parser("tta", help="(re)fill the TTA logit store of an experiment")
    tt.add_argument("results_dir", help="experiment folder or URI (results/<name>, s3://bucket/prefix/<name>)")
    tt.add_argument("--views", nargs="+", help="view names (default: the sweep's tta_views)")
    tt.set_defaults(func=cmd_tta)

    e = sub.add_parser("ensemble", help="combine stored TTA logits of the best trials")
    e.add_argument("results_dir", help="experiment folder or URI")
    e.add_argument("--top-k", type=int, default=3)
    e.add_argument("--combiner", default="mean_logits",
                   help="mean_logits, mean_probs, nll_weights, greedy or stacking (fitted on the selection split)")
    e.add_argument("--spec", help="ensembles/<name>.yaml (a bare name is looked up in the repo's ensembles/)")
    e.add_argument("--budget-gmacs", type=float,
                   help="without --spec: search for the most accurate ensemble (on the selection split) costing "
                        "<= X GMACs, write RESULTS_DIR/pareto.csv; with --spec: keep the top-ranked members that fit")
    e.add_argument("--select-split", default="val", help="the split budget search selects on (role 'select')")
    e.set_defaults(func=cmd_ensemble)

    ev_help = ("score every stored trial and ensemble on another dataset (all its images, any Usage) as a new "
               "report-only split; no retraining, no refitting; the leaderboard gains acc_NAME etc.")
    ev = sub.add_parser("evaluate", help=ev_help, description=ev_help)
    ev.add_argument("results_dir", help="experiment folder or URI (results/<name>)")
    ev.add_argument("--data", required=True, help="dataset path (csv, image folders, torchvision layout)")
    ev.add_argument("--name", help="split name (default: ext_<file or folder stem>)")
    ev.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    ev.set_defaults(func=cmd_evaluate)

    di_help = ("distil a built ensemble into one student: teacher = the ensemble's TTA logits on the train split "
               "(from its stored fitted numbers), loss = alpha*T^2*KL + (1-alpha)*CE, trained under Ray Train, "
               "selected on val, scored with TTA as member distill:<student> and added to the leaderboard")
    di = sub.add_parser("distill", help=di_help, description=di_help)
    di.add_argument("results_dir", help="experiment folder or URI (results/<name>)")
    di.add_argument("--ensemble", required=True, help="name of a built ensemble (ensembles/<name>.json there)")
    di.add_argument("--student", required=True, help="registry name or timm/<name> (see `fer-ray models`)")
    di.add_argument("--epochs", type=int, help="default: the sweep's train.epochs")
    di.add_argument("--temperature", type=float, default=4.0, help="KD softmax temperature T (default 4)")
    di.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term; 0 = plain CE (default 0.9)")
    di.add_argument("--img-size", type=int, help="student input size (default: the model's)")
    di.add_argument("--batch-size", type=int)
    di.add_argument("--lr", type=float)
    di.add_argument("--workers", type=int, default=0, help="DDP workers (default 0: Ray Train local mode)")
    di.add_argument("--name", help="member name suffix (default: the student name)")
    di.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all); ignored with RAY_ADDRESS")
    di.set_defaults(func=cmd_distill)

    r = sub.add_parser("report", help="leaderboard CSV/Markdown + HTML report with plots")
    r.add_argument("results_dir", help="experiment folder or URI")
    r.add_argument("--out", help="output folder or URI (default: RESULTS_DIR/report)")
    r.set_defaults(func=cmd_report)

    m = sub.add_parser("models", help="list registered models")
    m.add_argument("pattern", nargs="?", default="*")
    m.set_defaults(func=cmd_models)

    f = sub.add_parser("flops", help="params and GMACs (fvcore) of a model")
    f.add_argument("model")
    f.add_argument("--img-size", type=int)
    f.set_defaults(func=cmd_flops)

    da = sub.add_parser("data", help="write the synthetic set, or load and summarise a dataset")
    dsub = da.add_subparsers(dest="data_cmd", required=True)
    ds = dsub.add_parser("synth", help="write a synthetic Kaggle-format fer2013.csv")
    ds.add_argument("--out", required=True)
    ds.add_argument("--n", type=int, default=6000)
    ds.add_argument("--seed", type=int, default=0)
    dl = dsub.add_parser("load", help="load a dataset and print split sizes and class counts")
    dl.add_argument("path")
    dl.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    dl.add_argument("--on-bad-row", default="error", choices=["error", "skip"])
    for name, help_ in (("check", "find exact/near duplicates, split leakage, label conflicts and blank images"),
                        ("report", "write an EDA report (class balance, pixel stats, duplicates, samples; HTML)")):
        dq = dsub.add_parser(name, help=help_, description=help_)
        dq.add_argument("path", help="fer2013.csv, image-folder root or torchvision root")
        dq.add_argument("--format", default="auto", choices=["auto", *FORMATS])
        dq.add_argument("--threshold", type=int, default=4,
                        help="largest perceptual-hash distance (bits of 64) counted as a near duplicate (default 4)")
        dq.add_argument("--cache-dir", help="parquet cache of the loaded data (default .cache/fer_ray)")
        dq.add_argument("--out", required=name == "report",
                        help="groups table (.parquet or .csv)" if name == "check" else "output folder")
    da.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "sweep" and not (args.sweep or args.resume):
        build_parser().error("sweep: give a sweep file or --resume RESULTS_DIR")
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, StoreError, StorageError, yaml.YAMLError) as e:
        print(f"fer-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
