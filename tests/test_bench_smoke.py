"""Every benchmark runs in smoke mode (tiny sizes; correctness only, no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# bench_flops runs once, with --amp bf16 (the test below): that run is the plain smoke's fp32 run plus the bf16 arm.
SCRIPTS = sorted(s for s in BENCH.glob("bench_*.py") if s.stem != "bench_flops")


# The benchmarks that use Ray join the session's (``session_env``: RAY_ADDRESS), as they would join a cluster: their
# init_ray(num_cpus=...) then starts nothing. Run alone, each starts its own local Ray.
pytestmark = pytest.mark.subprocess


def run_smoke(script: str, out: Path, env: dict, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, script, "--smoke", *extra, "--out", str(out)], cwd=BENCH, env=env,
                          capture_output=True, text=True, timeout=600)  # a hang guard only
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_smoke(script, tmp_path, session_env):
    record = run_smoke(str(script), tmp_path / "r.jsonl", session_env)
    assert record["smoke"] is True and record["bench"] == script.stem.removeprefix("bench_")
    assert not (tmp_path / "r.jsonl").exists()  # smoke results are printed, never appended


def test_flops_bench_compares_bf16_with_fp32_in_one_process(tmp_path):
    record = run_smoke("bench_flops.py", tmp_path / "r", dict(os.environ), "--amp", "bf16")
    assert record["smoke"] is True and record["bench"] == "flops"
    row = record["models"][0]
    assert row["img_per_s"] > 0 and row["fraction_of_mm_peak"] == row["gflops"] / record["mm_peak_gflops"]
    assert row["bf16_img_per_s"] > 0 and row["bf16_speedup"] == row["bf16_img_per_s"] / row["img_per_s"]
