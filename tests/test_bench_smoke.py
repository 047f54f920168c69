"""Every benchmark runs in smoke mode (tiny sizes; correctness only, no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_smoke(script, tmp_path):
    out = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path / "r.jsonl")], cwd=BENCH,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert record["smoke"] is True and record["bench"] == script.stem.removeprefix("bench_")


def test_flops_bench_compares_bf16_with_fp32_in_one_process(tmp_path):
    out = subprocess.run([sys.executable, "bench_flops.py", "--smoke", "--amp", "bf16", "--out", str(tmp_path / "r")],
                         cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])["models"][0]
    assert row["bf16_img_per_s"] > 0 and row["bf16_speedup"] == row["bf16_img_per_s"] / row["img_per_s"]
