"""The ``fer-ray`` command: one subcommand per pipeline stage, each a thin call into the package.

``fer-ray demo`` runs everything on the synthetic set; ``sweep`` runs a sweep file end to end (or resumes
one); ``train`` runs one Ray Train job; ``tta``, ``ensemble`` and ``report`` re-run later stages on an
existing experiment folder; ``evaluate`` scores it on another dataset; ``distill`` trains a student of one of
its ensembles; ``export`` writes an ensemble or member as a self-contained ONNX/TorchScript bundle, which
``predict`` runs on images, folders, CSVs and videos and ``serve`` serves over HTTP (Ray Serve); ``models``/``flops``
inspect the registry; ``nodes`` prints the local Ray node plan of this box's GPUs; ``data`` writes or summarises data.
Every ``RESULTS`` argument and ``--out`` take a local path or a storage URI (``s3://bucket/prefix?...``, ``gs://``:
``fer_ray.storage``). ``sweep --time-limit 45m`` holds the whole run to a time limit (``fer_ray.budget``). Bad input
exits with status 2 and one line naming the file or field. A command that writes an experiment holds its lease
(``fer_ray.lease``) while it runs: a second writer of the same experiment is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from fer_ray.checkpoint import CheckpointError
from fer_ray.config import ConfigError, DataConfig, SweepConfig, TrainConfig, load_sweep, load_yaml
from fer_ray.data import DataError
from fer_ray.experiment import Experiment
from fer_ray.lease import LEASE, Lease
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
    started = time.monotonic()  # a time limit counts from here
    from fer_ray.durations import parse_duration

    limit = getattr(args, "time_limit", None)
    if limit is not None:
        try:
            parse_duration(limit)
        except ValueError as e:
            raise ConfigError(f"--time-limit: {e}") from None
    from fer_ray.models import check_model_names
    from fer_ray.pipeline import run_all

    if args.resume:  # the limit is this invocation's: the sweep file's held the first one
        exp = _leased(args, Experiment(args.resume))
        cfg = exp.sweep().replace(time_limit=limit)
    else:
        cfg = _apply_overrides(load_sweep(_sweep_file(args.sweep)), args)
        cfg = cfg.replace(time_limit=limit) if limit is not None else cfg
        check_model_names(cfg)
        exp = _new_experiment(args.out, cfg.name, args.overwrite, args)
    run_all(cfg, exp, resume=bool(args.resume), num_cpus=args.num_cpus, sweep_only=args.sweep_only,
            verbose=args.verbose, started=started, limit_source="--time-limit" if limit is not None else "time_limit")


def _leased(args, exp: Experiment, lease: Lease | None = None) -> Experiment:
    """``exp``, with its lease (``fer_ray.lease``) taken for this command until ``main`` returns: the one place a
    command that writes an experiment opens it. What the command needs of the experiment it checks itself (one
    line); a lease on a location that ends with nothing else written leaves nothing behind (``fer_ray.lease``)."""
    if lease is None:
        lease = Lease(exp, command=f"fer-ray {args.cmd}")
    args.held.enter_context(lease)
    return exp


def _new_experiment(out: str, name: str, overwrite: bool, args=None) -> Experiment:
    """The experiment ``name`` under ``out``, leased to the command ``args`` (none without). One that another live
    command writes is refused (nothing touched); a folder there already is refused unless fer_ray created it and
    ``overwrite`` is given (then it is removed; a new sweep must not mix its trials with an old one's); a folder
    fer_ray did not create is never touched."""
    exp = Experiment.under(out, name)
    lease = Lease(exp, command=f"fer-ray {args.cmd}" if args else "fer_ray")
    lease.check()  # a live writer: refused before anything is looked at or removed
    if not (exp.is_empty() or (exp.files() == [LEASE] and not exp.dirs())):  # not nothing, nor a dead lease only
        if not exp.owns():
            exp.remove(within=out)  # refuses with one line: not created by fer_ray
        if not overwrite:
            raise ConfigError(f"{exp.uri} already holds an experiment: continue it with --resume {exp.uri}, choose "
                              f"another --name or --out, or replace it with --overwrite")
        exp.remove(within=out)
    return _leased(args, exp, lease) if args else exp


def cmd_demo(args) -> None:
    args.sweep, args.resume = args.sweep or "demo.yaml", None
    args.name = args.data = args.workers_per_trial = args.gpus_per_trial = None
    args.sweep_only, args.wandb, args.overwrite, args.time_limit = False, False, True, None
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
    exp = _new_experiment(args.out, cfg.name, args.overwrite, args)
    trials = run_sweep(cfg, exp, num_cpus=args.num_cpus, verbose=args.verbose)
    print(trials.drop(columns=["config"]).to_string(index=False))


def cmd_tta(args) -> None:
    from fer_ray.pipeline import tta_stage

    exp = _leased(args, Experiment(args.results_dir))
    paths = tta_stage(exp, args.views)
    print(f"{len(paths)} logit files under {exp.uri_of('logits')}")


def cmd_ensemble(args) -> None:
    from fer_ray.ensemble import EnsembleSpec, ProtocolError, budget_search, run_ensemble
    from fer_ray.pipeline import ensemble_stage

    exp = _leased(args, Experiment(args.results_dir))
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

    exp = _leased(args, Experiment(args.results_dir))
    board = evaluate_external(exp, args.data, name=args.name, fmt=args.format, class_map=args.class_map)
    print(format_table(board))


def cmd_distill(args) -> None:
    from fer_ray.distill import distill

    row = distill(_leased(args, Experiment(args.results_dir)), args.ensemble, args.student, epochs=args.epochs,
                  temperature=args.temperature, alpha=args.alpha, img_size=args.img_size, name=args.name,
                  num_workers=args.workers, batch_size=args.batch_size, lr=args.lr, num_cpus=args.num_cpus)
    print(row.to_string())


def cmd_report(args) -> None:
    from fer_ray.pipeline import report_stage
    from fer_ray.report import format_table

    board = report_stage(args.results_dir, args.out)
    print(format_table(board))


def cmd_export(args) -> None:
    from fer_ray.export import export_bundle
    from fer_ray.storage import join_uri

    t0 = time.perf_counter()
    card = export_bundle(args.results_dir, args.out, ensemble=args.ensemble, member=args.member, fmt=args.format)
    check = card["check"]
    print(f"wrote {join_uri(args.out, card['graph']['file'])} ({card['graph']['bytes'] / 1e6:.1f} MB, {card['kind']} "
          f"{card['name']}: {len(card['members'])} member(s) × {len(card['views'])} view(s), "
          f"{card['cost']['gmacs_per_image']:.4g} GMACs per face) + model_card.json + README.md "
          f"in {time.perf_counter() - t0:.1f}s")
    print(f"checked on {check['images']} synthetic faces: max |Δ prob| {check['max_abs_diff_probs_vs_fer_ray']:.2g} "
          f"vs fer_ray's TTA + ensemble path, {check['max_abs_diff_probs_vs_torch_graph']:.2g} vs the torch graph")
    for split, m in card["metrics"].items():
        print(f"  {split:14s} ({m['role']:6s}) acc {m.get('accuracy', float('nan')):.4f}  macro-F1 "
              f"{m.get('macro_f1', float('nan')):.4f}  NLL {m.get('nll', float('nan')):.4f}  ECE "
              f"{m.get('ece', float('nan')):.4f}")


def cmd_predict(args) -> None:
    from fer_ray.predict import run_cli

    run_cli(args.bundle, args.inputs, args.out, threads=args.threads, faces=args.faces, batch=args.batch,
            every_k=args.every_k, labels=args.labels or bool(args.class_map), class_map=args.class_map,
            margin=args.margin, progress=not args.no_progress)


def cmd_serve(args) -> None:
    from fer_ray.serve import serve_forever

    serve_forever(args.bundle, host=args.host, port=args.port, replicas=args.replicas, num_cpus=args.num_cpus,
                  max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                  batching=not args.no_batching)


def cmd_models(args) -> None:
    from fer_ray.models import list_models, model_cfg

    for name in list_models(args.pattern):
        c = model_cfg(name)
        print(f"{name:32s} {c.in_chans}×{c.img_size}×{c.img_size}  {c.description}")
    print("timm/<name>                      any timm model (e.g. timm/efficientnet_b0)")


def cmd_flops(args) -> None:
    from fer_ray.flops import model_profile

    print(json.dumps(model_profile(args.model, img_size=args.img_size), indent=1))


def cmd_nodes(args) -> None:
    from fer_ray import gpu, nodes

    gpus = gpu.inventory()
    for g in gpus:
        print(f"GPU {g.index}: {g.name} ({g.accelerator_type}, compute capability {g.capability[0]}."
              f"{g.capability[1]}, {g.memory_gb:g} GB){'' if g.supported else ', left out'}")
    plan = nodes.plan_nodes(gpus, args.num_cpus or os.cpu_count() or 1)
    print(nodes.format_plan(plan, host=args.host, port=args.port, python=sys.executable))


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


def arg(*flags: str, **kw) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` call of a subcommand table."""
    return flags, kw


RESULTS = arg("results_dir", help="experiment folder or URI (results/<name>, s3://bucket/prefix/<name>)")
NUM_CPUS = arg("--num-cpus", type=int, help="CPUs for a local Ray (default: all); ignored with RAY_ADDRESS")
VERBOSE = arg("--verbose", action="store_true", help="also print Ray's trial tables and worker logs")
FORMAT = arg("--format", default="auto", choices=["auto", *FORMATS])
SWEEP_OPTS = [
    NUM_CPUS, VERBOSE,
    arg("--workers-per-trial", type=int, help="DDP workers per trial (0 = Ray Train local mode)"),
    arg("--gpus-per-trial", type=float, help="GPUs per trial: N whole GPUs (one per DDP worker), or a share of one "
                                             "below 1 (0.25 packs four small trials on a GPU)"),
    arg("--data", help="dataset path (csv, image folders, torchvision layout); default synthetic"),
    arg("--name", help="experiment name (default: the sweep's name)"),
]
DATA_QUALITY = [
    arg("path", help="fer2013.csv, image-folder root or torchvision root"), FORMAT,
    arg("--threshold", type=int, default=4,
        help="largest perceptual-hash distance (bits of 64) counted as a near duplicate (default 4)"),
    arg("--cache-dir", help="parquet cache of the loaded data (default .cache/fer_ray)"),
]

COMMANDS: dict[str, tuple] = {
    "sweep": (cmd_sweep, "run a sweep file: ASHA sweep → TTA → ensemble → leaderboard", [
        arg("sweep", nargs="?", help="sweeps/<file>.yaml (or a bare file name inside sweeps/)"),
        arg("--out", default="results", help="results root: a path or a URI such as s3://bucket/prefix "
                                             "(default: results)"),
        arg("--resume", metavar="RESULTS_DIR", help="continue an interrupted sweep in this experiment (path or URI)"),
        arg("--sweep-only", action="store_true", help="stop after the sweep (no TTA/ensemble/report)"),
        arg("--overwrite", action="store_true", help="replace an existing experiment of the same name (default: "
                                                     "refuse)"),
        arg("--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)"),
        arg("--time-limit", metavar="DURATION",
            help="end the whole run (sweep, TTA, ensembles, report) within this: 45m, 90s, 1.5h or seconds; "
                 "overrides the sweep file's time_limit. A short calibration plans the sweep (fewer trials, the last "
                 "rungs, the largest img_size cut to fit: budget.json); with --resume it limits this invocation"),
        *SWEEP_OPTS]),
    "demo": (cmd_demo, "the whole pipeline on the synthetic dataset (sweeps/demo.yaml)", [
        arg("--out", default="results/demo", help="experiment folder, replaced if it exists (default: results/demo)"),
        arg("--sweep", help="sweep file (default: sweeps/demo.yaml)"), NUM_CPUS, VERBOSE]),
    "train": (cmd_train, "one Ray Train (DDP) run of one model (a one-trial sweep: same checkpoints and resume)", [
        arg("--model", help="registry name or timm/<name> (see `fer-ray models`)"),
        arg("--config", help="YAML with optional `data:` and `train:` sections"),
        arg("--data", help="dataset path; default synthetic"),
        arg("--epochs", type=int), arg("--img-size", type=int), arg("--batch-size", type=int), arg("--lr", type=float),
        arg("--workers", type=int, help="DDP workers (0 = in-process local mode)"),
        arg("--gpu", action="store_true", help="one GPU per worker (nccl; AMP by compute capability)"),
        arg("--name", help="experiment name under --out (default: train_<date>_<time>)"),
        arg("--out", default="results", help="results root: a path or a URI such as s3://bucket/prefix"),
        arg("--overwrite", action="store_true", help="replace an existing experiment of the same name"),
        NUM_CPUS, VERBOSE]),
    "tta": (cmd_tta, "(re)fill the TTA logit store of an experiment (Ray tasks, one per checkpoint)", [
        RESULTS, arg("--views", nargs="+", help="view names (default: the sweep's tta_views)")]),
    "ensemble": (cmd_ensemble, "combine stored TTA logits of the best trials", [
        RESULTS, arg("--top-k", type=int, default=3),
        arg("--combiner", default="mean_logits",
            help="mean_logits, mean_probs, nll_weights, greedy or stacking (fitted on the selection split)"),
        arg("--spec", help="ensembles/<name>.yaml (a bare name is looked up in the repo's ensembles/)"),
        arg("--budget-gmacs", type=float,
            help="without --spec: search for the most accurate ensemble (on the selection split) costing <= X GMACs, "
                 "write RESULTS_DIR/pareto.csv; with --spec: keep the top-ranked members that fit"),
        arg("--select-split", default="val", help="the split budget search selects on (role 'select')")]),
    "evaluate": (cmd_evaluate, "score every stored trial and ensemble on another dataset (all its images, any Usage) "
                               "as a new report-only split; no retraining, no refitting; the leaderboard gains "
                               "acc_NAME etc.", [
        RESULTS, arg("--data", required=True, help="dataset path (csv, image folders, torchvision layout)"),
        arg("--name", help="split name (default: ext_<file or folder stem>)"), FORMAT,
        arg("--class-map", help="flat <class>/ folders named otherwise: anger=angry,sadness=sad,contempt=drop, or a "
                                "preset (rafdb: folders 1-7)")]),
    "distill": (cmd_distill, "distil a built ensemble into one student: teacher = the ensemble's TTA logits on the "
                             "train split (from its stored fitted numbers), loss = alpha*T^2*KL + (1-alpha)*CE, "
                             "trained under Ray Train, selected on val, scored with TTA as member distill:<student> "
                             "and added to the leaderboard", [
        RESULTS, arg("--ensemble", required=True, help="name of a built ensemble (ensembles/<name>.json there)"),
        arg("--student", required=True, help="registry name or timm/<name> (see `fer-ray models`)"),
        arg("--epochs", type=int, help="default: the sweep's train.epochs"),
        arg("--temperature", type=float, default=4.0, help="KD softmax temperature T (default 4)"),
        arg("--alpha", type=float, default=0.9, help="weight of the KD term; 0 = plain CE (default 0.9)"),
        arg("--img-size", type=int, help="student input size (default: the model's)"),
        arg("--batch-size", type=int), arg("--lr", type=float),
        arg("--workers", type=int, default=0, help="DDP workers (default 0: Ray Train local mode)"),
        arg("--name", help="member name suffix (default: the student name)"), NUM_CPUS]),
    "report": (cmd_report, "leaderboard CSV/Markdown + HTML report with plots", [
        RESULTS, arg("--out", help="output folder or URI (default: RESULTS_DIR/report)")]),
    "export": (cmd_export, "export an ensemble (or one member) as one ONNX/TorchScript graph: uint8 faces [B,48,48] "
                           "in, probabilities and logits out (TTA views, preprocessing and fitted combiner inside), "
                           "with model_card.json and README.md", [
        RESULTS, arg("--ensemble", help="a built ensemble (ensembles/<name>.json)"),
        arg("--member", help="or one member id (a trial; its stored TTA views averaged)"),
        arg("--format", default="onnx", choices=["onnx", "torchscript"],
            help="onnx (run with ONNX Runtime; default) or torchscript (run with torch)"),
        arg("--out", required=True, help="bundle folder or URI (s3://bucket/prefix?endpoint_override=...): new, "
                                         "empty, or an earlier bundle, replaced")]),
    "predict": (cmd_predict, "run a bundle on images, folders (recursive), a fer2013.csv or videos: one row per face "
                             "(source, frame, box, 7 probabilities, label, confidence, error)", [
        arg("bundle", help="a bundle written by `fer-ray export`: its folder or URI (s3://bucket/prefix?...)"),
        arg("inputs", nargs="+", metavar="INPUT", help="image files, folders, fer2013.csv files, video files"),
        arg("--faces", default="detect", choices=["detect", "whole"],
            help="detect: find faces with OpenCV's Haar cascade and crop them (default); whole: each image is a face"),
        arg("--batch", type=int, default=256, help="faces per forward pass (default 256)"),
        arg("--out", help="preds.csv or preds.parquet (default: CSV on stdout, summary on stderr)"),
        arg("--every-k", type=int, default=1, help="videos: score every k-th frame (default 1)"),
        arg("--labels", action="store_true", help="read folders as labelled datasets (train/<class>/ or <class>/): "
                                                  "adds true_label and prints accuracy, recall, confusion"),
        arg("--class-map", help="with labelled folders: anger=angry,sadness=sad,contempt=drop, or rafdb (RAF-DB's "
                                "1..7), fer (0..6); implies --labels"),
        arg("--margin", type=float, default=0.1, help="detect: share of the face box added on each side (0.1)"),
        arg("--threads", type=int, help="runtime threads (default: all cores)"),
        arg("--no-progress", action="store_true", help="no progress bar")]),
    "serve": (cmd_serve, "serve a bundle over HTTP with Ray Serve: POST /predict with an image (raw bytes, multipart "
                         "files, or JSON faces), JSON probabilities back; dynamic batching", [
        arg("bundle", help="a bundle written by `fer-ray export`: its folder or URI (s3://bucket/prefix?...; every "
                           "replica reads it from there)"),
        arg("--port", type=int, default=8000), arg("--host", default="127.0.0.1",
                                                     help="address to bind (default 127.0.0.1: this machine only)"),
        arg("--replicas", type=int, default=1, help="model replicas (each asks for a GPU when the cluster has one)"),
        arg("--max-batch-size", type=int, default=32, help="dynamic batching: most faces per batch (32)"),
        arg("--batch-wait-ms", type=float, default=5.0, help="dynamic batching: longest wait for a batch to fill"),
        arg("--no-batching", action="store_true", help="score each request on its own"), NUM_CPUS]),
    "models": (cmd_models, "list registered models", [arg("pattern", nargs="?", default="*")]),
    "flops": (cmd_flops, "params and GMACs (fvcore) of a model", [arg("model"), arg("--img-size", type=int)]),
    "nodes": (cmd_nodes, "this box's GPUs and the Ray nodes a local run starts for them (one per GPU type; GPUs the "
                         "installed torch cannot drive left out), with the equivalent `ray start` lines", [
        arg("--num-cpus", type=int, help="CPUs to split between the nodes (default: all)"),
        arg("--host", default="127.0.0.1", help="node IP for the `ray start` lines (default 127.0.0.1)"),
        arg("--port", type=int, default=6379, help="the head's GCS port in the `ray start` lines (default 6379)")]),
    "data": (cmd_data, "write the synthetic set, or load, check or report on a dataset", {
        "synth": ("write a synthetic Kaggle-format fer2013.csv", [
            arg("--out", required=True), arg("--n", type=int, default=6000), arg("--seed", type=int, default=0)]),
        "load": ("load a dataset and print split sizes and class counts", [
            arg("path"), FORMAT, arg("--on-bad-row", default="error", choices=["error", "skip"])]),
        "check": ("find exact/near duplicates, split leakage, label conflicts and blank images", [
            *DATA_QUALITY, arg("--out", help="groups table (.parquet or .csv)")]),
        "report": ("write an EDA report (class balance, pixel stats, duplicates, samples; HTML)", [
            *DATA_QUALITY, arg("--out", required=True, help="output folder")]),
    }),
}
"""Subcommand → (function, help, arguments); ``data`` has its own table of sub-subcommands."""


def _add_args(parser: argparse.ArgumentParser, args: list) -> None:
    for flags, kw in args:
        parser.add_argument(*flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fer-ray", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (func, help_, args) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        if isinstance(args, dict):
            nested = sp.add_subparsers(dest=f"{name}_cmd", required=True)
            for sub_name, (sub_help, sub_args) in args.items():
                _add_args(nested.add_parser(sub_name, help=sub_help, description=sub_help), sub_args)
        else:
            _add_args(sp, args)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "sweep" and not (args.sweep or args.resume):
        build_parser().error("sweep: give a sweep file or --resume RESULTS_DIR")
    try:
        with contextlib.ExitStack() as args.held:  # the leases a writing command takes (_leased), released at its end
            args.func(args)
    except (ConfigError, DataError, CheckpointError, StoreError, StorageError, yaml.YAMLError) as e:
        print(f"fer-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
