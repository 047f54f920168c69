"""``scripts/gpu_check.py --device cpu --smoke`` runs every section on synthetic data, so the GPU check cannot rot.

The same code paths run on the GPU machine (``make gpu-check``): the CPU takes bf16 through ``torch.autocast("cpu")``,
fp16 through autocast plus ``torch.amp.GradScaler("cpu")``, and DDP through gloo instead of nccl.
"""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fer_ray import engine, sweep
from fer_ray.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "correctness", "throughput", "accuracy", "packing", "ray"]


def test_amp_rule_on_cpu_takes_the_asked_dtype():
    cpu = torch.device("cpu")
    assert engine.autocast_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert engine.autocast_dtype(TrainConfig(amp="fp16"), cpu) is torch.float16
    assert engine.autocast_dtype(TrainConfig(), cpu) is None
    assert isinstance(engine.grad_scaler(cpu, torch.float16), torch.amp.GradScaler)


@pytest.mark.ray
@pytest.mark.subprocess
def test_gpu_check_smoke_on_cpu(tmp_path, session_env):
    """Every section, the Ray one last, on the session's Ray (``--join-ray``; on the GPU machine it starts its own)."""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--join-ray", "--out", str(out)], cwd=tmp_path, env=session_env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted(out.glob("gpu_check_*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").is_file()
    doc = json.loads(reports[0].read_text())
    assert list(doc["sections"]) == SECTIONS
    for name, section in doc["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        assert section["ray_imported"] is (name == "ray"), name  # the first five run without Ray
    correctness = doc["sections"]["correctness"]
    # A failure names each run's per-step losses, thread count and the CPU (a non-finite bf16 run seen once).
    why = [(r["model"], r["precision"], r["threads"], r["losses"]) for r in correctness["training"] if not r["pass"]]
    assert correctness["failed_checks"] == [], (why, doc["sections"]["environment"].get("cpu_model"))
    assert correctness["skipped_for_budget"] == []
    runs = {(r["model"], r["precision"]): r for r in correctness["training"]}
    # fp32 and bf16 for every model, fp16 once (Plan.fp16_models: a slow path on a CPU, the same for any model).
    models = ("basic_cnn", "resnet_fer", "timm/resnet18")
    assert sorted(runs) == sorted([(m, p) for m in models for p in ("fp32", "bf16")] + [("basic_cnn", "fp16")])
    assert runs["basic_cnn", "bf16"]["amp_dtype"] == "torch.bfloat16"
    assert runs["basic_cnn", "bf16"]["logits_dtype"] == "torch.bfloat16"
    assert runs["basic_cnn", "fp16"]["scaler"] == "GradScaler" and runs["basic_cnn", "fp32"]["scaler"] is None
    assert all(r["pass"] and r["steps"] == 12 for r in runs.values())
    assert correctness["ddp"]["backend"] == "gloo" and correctness["ddp"]["wrapped_as"] == "DistributedDataParallel"
    assert correctness["tta_device_vs_cpu"]["pass"]
    throughput = doc["sections"]["throughput"]
    assert throughput["table"] and all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in throughput["table"])
    assert throughput["skipped_for_budget"] == [] and len(throughput["table"]) == 4  # 2 models × fp32/AMP
    accuracy = doc["sections"]["accuracy"]
    assert len(accuracy["epochs"]) == 2 and 0 <= accuracy["public_test_acc_tta"] <= 1  # Plan.smoke's fixed epochs
    assert accuracy["loop_hooks"] == ["EMA", "EarlyStopping", "Record", "Budget"] and not accuracy["stopped_by_budget"]
    packing = doc["sections"]["packing"]
    # Two processes prove the rounds (release k workers together, sum their rates); the GPU run packs 1, 2 and 4.
    assert [r["processes"] for r in packing["table"]] == [1, 2] and packing["steps_per_round"] == 16
    assert packing["recommended_gpus_per_trial"] in (1.0, 0.5)
    ray = doc["sections"]["ray"]
    assert ray["failed_checks"] == [] and ray["num_cpus"] == 2
    assert ray["train_trial"]["pass"] and ray["train_trial"]["epochs"] == 2, ray["train_trial"]
    sweep = ray["sweep"]
    assert sweep["pass"] and sweep["trials"] == 4 and sweep["epochs_run"] == [1, 1, 2, 2], sweep
    assert any(r["kind"] == "ensemble" for r in sweep["leaderboard_top"])
    text = reports[0].with_suffix(".md").read_text()
    assert all(f"{name}: ok" in text for name in SECTIONS)


@pytest.fixture(scope="module")
def gpu_check():
    """``scripts/gpu_check.py`` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def stub_correctness(gpu_check, monkeypatch, clock: FakeClock, step_s: float) -> list:
    """Replace the correctness checks by stubs; each training run moves ``clock`` on by ``step_s``."""
    runs = []

    def train(ctx, name, precision):
        runs.append((name, precision))
        ctx.trained[name] = object()
        clock.now += step_s
        return {"pass": True}

    monkeypatch.setattr(gpu_check, "train_fixed_batch", train)
    monkeypatch.setattr(gpu_check, "ddp_check", lambda ctx: {"pass": True})
    monkeypatch.setattr(gpu_check, "tta_device_vs_cpu", lambda ctx, model: {"pass": True})
    return runs


def context(gpu_check, clock: FakeClock, budget: float):
    return gpu_check.Context(argparse.Namespace(smoke=True), torch.device("cpu"), gpu_check.Plan.smoke(),
                             emit=lambda **kv: None, deadline=clock.now + budget, clock=clock)


def test_correctness_budget_skips_models_and_reports_them(gpu_check, monkeypatch):
    """The real run's budget: once it is spent (here after basic_cnn's 3 runs, by the injected clock), the models
    left are skipped and named in the section's result; the first model always runs."""
    clock = FakeClock()
    runs = stub_correctness(gpu_check, monkeypatch, clock, step_s=10.0)
    result = gpu_check.section_correctness(context(gpu_check, clock, budget=25.0))
    assert runs == [("basic_cnn", p) for p in gpu_check.PRECISIONS]
    assert result["skipped_for_budget"] == ["resnet_fer", "timm/resnet18"]
    assert [r["model"] for r in result["training"]] == ["basic_cnn"] * 3 and result["failed_checks"] == []
    clock = FakeClock()
    runs = stub_correctness(gpu_check, monkeypatch, clock, step_s=10.0)
    result = gpu_check.section_correctness(context(gpu_check, clock, budget=-1.0))  # spent before it starts
    assert len(runs) == 3 and result["skipped_for_budget"] == ["resnet_fer", "timm/resnet18"]


def test_smoke_has_no_budget_and_fixed_work(gpu_check, monkeypatch):
    """``--smoke`` sets every budget to infinity and sizes every section in steps/epochs, so however slow the
    machine (here: an hour per training run), all 7 correctness runs of the smoke happen (fp16 for the first model
    only), and the GPU run's plan trains all 9."""
    args = gpu_check.parse_args(["--smoke"])
    assert all(math.isinf(getattr(args, n)) for n in ("correctness_s", "throughput_s", "budget_s", "packing_s"))
    assert not any(math.isinf(getattr(gpu_check.parse_args([]), n)) for n in ("correctness_s", "budget_s"))
    plan = gpu_check.Plan.smoke()
    assert plan.tp_steps and plan.acc_epochs and plan.packing_steps
    assert gpu_check.Plan().packing_ks == (1, 2, 4)  # the GPU run tries four trials to a GPU; the smoke two
    clock = FakeClock()
    runs = stub_correctness(gpu_check, monkeypatch, clock, step_s=3600.0)
    result = gpu_check.section_correctness(context(gpu_check, clock, budget=args.correctness_s))
    assert len(runs) == 7 and result["skipped_for_budget"] == [] and runs.count(("basic_cnn", "fp16")) == 1
    assert [len(gpu_check.Plan().precisions(m)) for m in gpu_check.CORRECTNESS_MODELS] == [3, 3, 3]


def test_throughput_budget_skips_models_and_reports_them(gpu_check, monkeypatch):
    clock = FakeClock()

    def measure(ctx, name, amp_cfg, peak):
        clock.now += 10.0
        return [{"model": name, "train_img_s": 1.0, "infer_img_s": 1.0}]

    monkeypatch.setattr(gpu_check, "measure_model", measure)
    monkeypatch.setattr(gpu_check, "matmul_peak_tflops", lambda device, n: 1.0)
    result = gpu_check.section_throughput(context(gpu_check, clock, budget=5.0))
    assert [r["model"] for r in result["table"]] == ["basic_cnn"] and result["skipped_for_budget"] == ["resnet_fer"]


def test_budget_hook_ends_a_training_run(gpu_check):
    """The accuracy section's ``Budget`` hook ends ``TrainingRun.fit`` once the next epoch would end past the
    budget (an injected clock: 10 s per epoch, 25 s of budget → 2 epochs of 6), and never with ``inf``."""
    clock = FakeClock()
    images, labels = gpu_check.synthetic_arrays(32)
    cfg = TrainConfig(model="basic_cnn", batch_size=16, epochs=6, num_workers=0, scheduler="none")
    run = gpu_check.TrainingRun(cfg, gpu_check.run_arrays(images, labels), torch.device("cpu"))
    tick = gpu_check.Record(on_epoch=lambda run, m: setattr(clock, "now", clock.now + 10.0))
    stop = gpu_check.Budget(25.0, clock)
    assert len(run.fit([tick, stop])) == 2 and stop.stopped
    run = gpu_check.TrainingRun(cfg.replace(epochs=3), gpu_check.run_arrays(images, labels), torch.device("cpu"))
    stop = gpu_check.Budget(math.inf, clock)
    assert len(run.fit([tick, stop])) == 3 and not stop.stopped


def test_ray_section_is_skipped_where_ray_does_not_import(gpu_check, monkeypatch, tmp_path):
    """Without Ray (the GPU machine when its pack did not travel) the ray section says so and the run still passes."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = gpu_check.section_ray(context(gpu_check, FakeClock(), budget=math.inf))
    assert result["status"] == "skipped" and "pack_ray" in result["reason"]
    report = gpu_check.Report(tmp_path, {"date": "d", "device_name": "cpu", "command": "c"}, stem="r")
    report.run("ray", gpu_check.section_ray, context(gpu_check, FakeClock(), budget=math.inf))
    section = json.loads((tmp_path / "r.json").read_text())["sections"]["ray"]
    assert section["status"] == "skipped" and "ray: skipped" in (tmp_path / "r.md").read_text()


def test_ray_configs_pack_four_trials_on_one_gpu(gpu_check):
    """The Ray section's sweep: 4 trials at a quarter GPU each on CUDA (one CPU each on the CPU: two at a time, in
    two processes that Tune reuses), one halving."""
    for device in ("cuda", "cpu"):
        ctx = gpu_check.Context(argparse.Namespace(smoke=device == "cpu"), torch.device(device),
                                gpu_check.Plan.smoke(), emit=lambda **kv: None, deadline=math.inf)
        cfg = gpu_check.ray_sweep_config(ctx, Path("cache"))
        assert cfg.num_trials() == 4 and cfg.asha.synchronous and cfg.train.num_workers == 0
        assert (cfg.train.use_gpu, cfg.train.gpu_fraction) == ((True, 0.25) if device == "cuda" else (False, 1.0))
        assert cfg.train.cpus_per_worker == (2.0 if device == "cuda" else 1.0) and sweep.reuses_actors(cfg)
        train = gpu_check.ray_train_config(ctx)
        assert train.num_workers == 1 and train.use_gpu is (device == "cuda")
        assert train.amp == cfg.train.amp == ("auto" if device == "cuda" else "native")
