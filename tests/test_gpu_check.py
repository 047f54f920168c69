"""``scripts/gpu_check.py --device cpu --smoke`` runs every section on synthetic data, so the GPU check cannot rot.

The same code paths run on the GPU machine (``make gpu-check``): the CPU takes bf16 through ``torch.autocast("cpu")``,
fp16 through autocast plus ``torch.amp.GradScaler("cpu")``, and DDP through gloo instead of nccl.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from fer_ray import engine
from fer_ray.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "correctness", "throughput", "accuracy", "packing"]


def test_amp_rule_on_cpu_takes_the_asked_dtype():
    cpu = torch.device("cpu")
    assert engine.autocast_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert engine.autocast_dtype(TrainConfig(amp="fp16"), cpu) is torch.float16
    assert engine.autocast_dtype(TrainConfig(), cpu) is None
    assert isinstance(engine.grad_scaler(cpu, torch.float16), torch.amp.GradScaler)


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted(out.glob("gpu_check_*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").is_file()
    doc = json.loads(reports[0].read_text())
    assert list(doc["sections"]) == SECTIONS and doc["meta"]["ray_imported"] is False
    for name, section in doc["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
    correctness = doc["sections"]["correctness"]
    assert correctness["failed_checks"] == []
    runs = {(r["model"], r["precision"]): r for r in correctness["training"]}
    assert len(runs) == 9 and runs["basic_cnn", "bf16"]["amp_dtype"] == "torch.bfloat16"
    assert runs["basic_cnn", "fp16"]["scaler"] == "GradScaler" and runs["basic_cnn", "fp32"]["scaler"] is None
    assert correctness["ddp"]["backend"] == "gloo"
    throughput = doc["sections"]["throughput"]
    assert throughput["table"] and all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in throughput["table"])
    accuracy = doc["sections"]["accuracy"]
    assert accuracy["epochs"] and 0 <= accuracy["public_test_acc_tta"] <= 1
    packing = doc["sections"]["packing"]
    assert [r["processes"] for r in packing["table"]] == [1, 2, 4]
    assert packing["recommended_gpus_per_trial"] in (1.0, 0.5, 0.25)
    text = reports[0].with_suffix(".md").read_text()
    assert all(f"{name}: ok" in text for name in SECTIONS)
