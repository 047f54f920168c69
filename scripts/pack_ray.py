#!/usr/bin/env python3
"""Pack Ray for the GPU machine: ``.cache/gpu/ray_site.tar.xz``, an installed, stripped ``ray[default,tune,train]``.

The GPU machine (``make gpu-check``) runs Python 3.12 with no network and no Ray, and a call carries at most
64 MiB; Ray's cp312 manylinux wheel alone is ~79 MB. This script, run where PyPI is reachable:

1. ``pip download``s ``ray[default,tune,train]==VERSION`` and its requirements as cp312 manylinux x86_64 wheels
   (``--only-binary=:all:``) into ``--cache``; ``default`` because ``fer_ray.cluster.init_ray`` starts the dashboard,
   which refuses to start without its packages (``ray.dashboard.optional_deps``), ``tune``/``train`` for the sweep;
2. leaves out every requirement the GPU machine's image already holds (``ON_GPU``: the package list of
   ``/work/.library/device/KINDS.md``, 2026-11-17; ``--carry NAME`` keeps one anyway);
3. installs the rest (``pip install --no-deps --no-compile --target``) into a staging folder and strips what a
   one-node Ray Train/Tune run never loads (``STRIP``: Java jars, RLlib, Serve, LLM, the dashboard UI's static
   files, console scripts, caches);
4. writes it as one xz-compressed tar (``--out``) and a manifest beside it (``.json``: packages, versions, sizes).

``make gpu-check`` / ``make gpu-check-ray`` unpack the tar into ``GPU_SITE`` (on ``PYTHONPATH``) when it is present
(``GPU_RAY_PACK``). Its size decides the plan (docs/gpu.md, "Carrying Ray"): 34.5 MiB do not fit beside the 47 MiB
FER-2013 pack in one call's 64 MiB, so the Ray section runs in a call of its own that carries ``.whl`` and
``.cache/gpu`` (``make gpu-check-ray``: synthetic data, no FER-2013 pack).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
ON_GPU = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
"""Packages the GPU machine's image holds (KINDS.md); a requirement among them is not carried."""
STRIP = ("bin", "ray/jars", "ray/rllib", "ray/serve", "ray/llm", "ray/dashboard/client/build/static")
"""Paths under the staging folder that are deleted (the dashboard keeps its ``build/index.html``, an empty
``static/``: it refuses to start without the folder, and nobody opens the UI there)."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised project name, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return norm(name), version


def download(ray_version: str, cache: Path) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(cache),
           f"ray[default,tune,train]=={ray_version}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return sorted(cache.glob("*.whl"))


def pick(wheels: list[Path], carry: set[str]) -> tuple[list[Path], list[str]]:
    """The newest wheel of each project that is not on the GPU machine (``ray`` and ``carry`` always)."""
    newest: dict[str, Path] = {}
    for w in wheels:  # a cache reused across versions may hold several; pip resolved the last download's
        name, _ = wheel_name(w)
        if name not in newest or w.stat().st_mtime > newest[name].stat().st_mtime:
            newest[name] = w
    keep = {n: w for n, w in newest.items() if n == "ray" or n in carry or n not in ON_GPU}
    return [keep[n] for n in sorted(keep)], sorted(set(newest) - set(keep))


def install(wheels: list[Path], site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           *[f"--platform={p}" for p in PLATFORMS], "--target", str(site), *map(str, wheels)]
    subprocess.run(cmd, check=True)


def strip(site: Path) -> int:
    """Delete ``STRIP`` and every ``__pycache__``; returns the bytes removed."""
    before = tree_bytes(site)
    for rel in STRIP:
        path = site / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (site / "ray/dashboard/client/build/static").mkdir(parents=True, exist_ok=True)
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return before - tree_bytes(site)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def write_tar(site: Path, out: Path, preset: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    xz = shutil.which("xz")
    if xz:  # multithreaded and faster than Python's lzma at the same ratio
        with open(tmp, "wb") as f:
            tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run([xz, f"-{preset}", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=True)
            if tar.wait():
                raise RuntimeError("tar failed")
    else:
        with tarfile.open(tmp, "w:xz", preset=preset) as tar:
            tar.add(site, arcname=".")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ray", default="2.60.0", help="Ray version (the project's)")
    p.add_argument("--out", default=str(ROOT / ".cache" / "gpu" / "ray_site.tar.xz"),
                   help="git-ignored, and outside .gpu/ so that carrying .gpu (the FER-2013 pack) never takes it along")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "ray_wheels"), help="where the wheels are downloaded")
    p.add_argument("--carry", action="append", default=[], help="carry this package even if the GPU image has it")
    p.add_argument("--preset", type=int, default=9, help="xz preset (0-9)")
    p.add_argument("--limit-mib", type=float, default=64.0, help="what one call may carry, for the report")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    wheels = download(args.ray, Path(args.cache))
    carried, skipped = pick(wheels, {norm(c) for c in args.carry})
    print(f"carrying {len(carried)} packages: {', '.join(w.name for w in carried)}", flush=True)
    print(f"on the GPU machine already ({len(skipped)}): {', '.join(skipped)}", flush=True)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="pack_ray_") as tmp:
        site = Path(tmp) / "site"
        install(carried, site)
        installed = tree_bytes(site)
        removed = strip(site)
        write_tar(site, out, args.preset)
        unpacked = tree_bytes(site)
    size = out.stat().st_size
    manifest = {"ray": args.ray, "python": "3.12", "platforms": list(PLATFORMS), "tar": out.name,
                "tar_bytes": size, "tar_mib": round(size / 2**20, 2), "unpacked_bytes": unpacked,
                "installed_bytes": installed, "stripped_bytes": removed, "stripped": list(STRIP),
                "carried": [dict(zip(("name", "version"), wheel_name(w))) | {"wheel_bytes": w.stat().st_size}
                            for w in carried],
                "left_to_the_gpu_image": skipped, "seconds": round(time.perf_counter() - t0, 1)}
    out.with_suffix("").with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {size / 2**20:.1f} MiB ({unpacked / 2**20:.0f} MiB unpacked, {removed / 2**20:.0f} MiB "
          f"stripped) of the {args.limit_mib:g} MiB a call carries", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
