# Two commands: `make demo` and `make test`. Each creates .venv on a fresh machine. (`make gpu-check`, below, is for
# the GPU machine and uses no .venv.)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fer-ray demo --out results/demo

# Two pytest workers (pytest-xdist), each with its own session Ray: the suite waits on Ray start-ups, process spawns
# and polls more than it computes. One module is one unit of work, long ones first (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25

# The inner loop: every test that starts no Ray and no child process (markers set in tests/conftest.py).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not ray and not subprocess"

# The GPU check of issue 14 (scripts/gpu_check.py), as the GPU machine runs it: its system python3, no .venv.
# Wheels carried in .whl/ (kornia, kornia_rs, fvcore and the fvcore deps it lacks) are installed into GPU_SITE; the
# FER-2013 pack .gpu/fer2013.npz comes from scripts/pack_fer2013.py; Ray, when its pack GPU_RAY_PACK
# (scripts/pack_ray.py: an installed, stripped ray[default,tune,train], 34.5 MiB) travels, is unpacked into GPU_SITE
# and the last section (ray) runs, else it is reported skipped. The Ray pack and the FER-2013 pack do not fit in one
# call's 64 MiB together: `make gpu-check` (carry .whl and .gpu) runs sections a-e with ray skipped, `make
# gpu-check-ray` (carry .whl and .cache/gpu) environment and ray on synthetic data. Report: OUT (default docs/gpu).
GPU_PYTHON ?= python3
GPU_WHEELS ?= .whl
GPU_SITE ?= /tmp/site
GPU_RAY_PACK ?= .cache/gpu/ray_site.tar.xz
GPU_DEVICE ?= cuda
GPU_OUT ?= $(if $(OUT),$(OUT),docs/gpu)
GPU_CHECK_ARGS ?=
GPU_RUN = PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) scripts/gpu_check.py --device $(GPU_DEVICE) \
	--out $(GPU_OUT)

.PHONY: gpu-site gpu-check-ray

gpu-site:
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps \
		--no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	if [ -f $(GPU_RAY_PACK) ]; then mkdir -p $(GPU_SITE) && $(GPU_PYTHON) -c 'import sys, tarfile, time; \
		t = time.time(); tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data"); \
		print(f"Ray pack unpacked into {sys.argv[2]} in {time.time() - t:.1f} s")' $(GPU_RAY_PACK) $(GPU_SITE); fi

gpu-check: gpu-site
	$(GPU_RUN) --data .gpu/fer2013.npz $(GPU_CHECK_ARGS)

gpu-check-ray: gpu-site
	$(GPU_RUN) --sections environment,ray --name gpu_check_$$(date +%F)_ray $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf results .pytest_cache
