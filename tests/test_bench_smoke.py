"""Every benchmark runs in smoke mode (tiny sizes; correctness only, no timing asserted)."""

import json
import os
from pathlib import Path

import pytest

from fer_ray.testing import ScriptRunner, machine_reference

BENCH = Path(__file__).resolve().parent.parent / "bench"
# bench_flops runs once, with --amp bf16 (the test below): that run is the plain smoke's fp32 run plus the bf16 arm.
SCRIPTS = sorted(s for s in BENCH.glob("bench_*.py") if s.stem != "bench_flops")


# The benchmarks that use Ray join the session's (``session_env``: RAY_ADDRESS), as they would join a cluster: their
# init_ray(num_cpus=...) then starts nothing. Run alone, each starts its own local Ray. Each smoke is a child process
# forked from one that imported torch, Ray and fer_ray once (``ScriptRunner``), as ``python bench/X.py`` minus the
# ~5-8 s of imports.
pytestmark = pytest.mark.subprocess
RUNNER = ScriptRunner()


def run_smoke(script: str, out: Path, env: dict, *extra: str) -> dict:
    proc = RUNNER.run(BENCH / script, ["--smoke", *extra, "--out", str(out)], env=env, cwd=BENCH,
                      timeout=600)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
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


def test_script_runner_is_python_running_the_script(tmp_path):
    """What ``python script.py args`` gives: argv, the environment and folder asked for, stdout/stderr of the child's
    file descriptors, the exit status (``sys.exit(3)``; 1 and the traceback on an exception)."""
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint(sys.argv[1:], os.getcwd(), os.environ['X'])\nos.write(2, b'fd2')\n"
                      "sys.exit(3) if sys.argv[1] == 'a' else 1 / 0\n")
    proc = RUNNER.run(script, ["a"], env={"X": "y"}, cwd=tmp_path, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, f"['a'] {tmp_path} y\n", "fd2")
    proc = RUNNER.run(script, ["b"], env={"X": "y"}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr


def test_ablation_budget_counts_only_the_epochs_that_ended_within_it():
    """The ablation's ``Budget``: an epoch ending past the limit stops the run and is not scored, though it is in
    the curve (a run cut after 15 epochs must not read as 16). Injected clock; no training."""
    import importlib.util
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_recipe_ablation", BENCH / "bench_recipe_ablation.py")
        ablation = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ablation)
    finally:
        sys.path.remove(str(BENCH))
    ends = iter([0.0, 100.0, 200.0, 300.0, 361.0])  # t0, then the end of epochs 1-4
    budget = ablation.Budget(360.0, clock=lambda: next(ends))
    run = SimpleNamespace(epoch=0, stop=False)
    for val in [0.40, 0.55, 0.60, 0.70]:
        run.epoch += 1
        budget.after_epoch(run, {"val_acc": val, "images": 1000, "train_time_s": 90.0})
        assert run.stop == (run.epoch == 4)
    assert (budget.best, budget.within, budget.images, budget.train_s) == (0.60, 3, 3000, 270.0)
    assert [(c["epoch"], c["within"]) for c in budget.curve] == [(1, True), (2, True), (3, True), (4, False)]
    assert budget.curve[-1]["val_acc"] == 0.70


def test_machine_reference_times_a_step_and_a_loop_and_restores_the_threads():
    import torch

    threads = torch.get_num_threads()
    ref = machine_reference(steps=2)
    assert ref["torch_step_ms"] > 0 and ref["python_loop_ms"] > 0 and ref["cpu_capability"]
    assert torch.get_num_threads() == threads
