# Two commands: `make demo` and `make test`. Each creates .venv on a fresh machine. (`make gpu-check`, below, is for
# the GPU machine and uses no .venv.)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fer-ray demo --out results/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The GPU check of issue 14 (scripts/gpu_check.py), as the GPU machine runs it: its system python3, no .venv and
# no Ray. Wheels carried in .whl/ (kornia, kornia_rs, fvcore and the fvcore deps it lacks) are installed into
# GPU_SITE; the FER-2013 pack .gpu/fer2013.npz comes from scripts/pack_fer2013.py. Report: OUT (default docs/gpu).
GPU_PYTHON ?= python3
GPU_WHEELS ?= .whl
GPU_SITE ?= /tmp/site
GPU_DEVICE ?= cuda
GPU_OUT ?= $(if $(OUT),$(OUT),docs/gpu)
GPU_CHECK_ARGS ?=

gpu-check:
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps \
		--no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE):. PYTHONUNBUFFERED=1 $(GPU_PYTHON) scripts/gpu_check.py --device $(GPU_DEVICE) \
		--data .gpu/fer2013.npz --out $(GPU_OUT) $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf results .pytest_cache
