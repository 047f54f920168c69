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


# The benchmarks start their own Ray: the session's is paused for this module (``no_session_ray``, which also sorts
# the module after the tests that use the session's Ray), and its address is kept out of their environment, or they
# would join it instead of starting their own.
pytestmark = [pytest.mark.subprocess, pytest.mark.usefixtures("no_session_ray")]


def run_smoke(script: str, out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, script, "--smoke", *extra, "--out", str(out)], cwd=BENCH, env=env,
                          capture_output=True, text=True, timeout=600)  # a hang guard only
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_smoke(script, tmp_path):
    record = run_smoke(str(script), tmp_path / "r.jsonl")
    assert record["smoke"] is True and record["bench"] == script.stem.removeprefix("bench_")
    assert not (tmp_path / "r.jsonl").exists()  # smoke results are printed, never appended


def test_flops_bench_compares_bf16_with_fp32_in_one_process(tmp_path):
    record = run_smoke("bench_flops.py", tmp_path / "r", "--amp", "bf16")
    assert record["smoke"] is True and record["bench"] == "flops"
    row = record["models"][0]
    assert row["img_per_s"] > 0 and row["fraction_of_mm_peak"] == row["gflops"] / record["mm_peak_gflops"]
    assert row["bf16_img_per_s"] > 0 and row["bf16_speedup"] == row["bf16_img_per_s"] / row["img_per_s"]
