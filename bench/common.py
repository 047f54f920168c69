"""Shared benchmark plumbing: argument parsing with --smoke, timing, and one JSON line of results per run."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results.jsonl"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code runs (CI), numbers meaningless")
    p.add_argument("--out", default=str(RESULTS), help="JSON-lines file to append results to")
    return p


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def emit(name: str, result: dict, args) -> dict:
    """Print the result and append it as one JSON line (skipped in smoke mode)."""
    record = {"bench": name, "smoke": args.smoke, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": platform.node(), "cpus": torch.get_num_threads(), "torch": torch.__version__, **result}
    print(json.dumps(record), flush=True)
    if not args.smoke:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    sys.exit("import me")
