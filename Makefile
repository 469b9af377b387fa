# gpupool — every target creates and reuses .venv on its own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck bench bench-quick bench-gpu allowlist kernel-sweep fuzz clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/python -m gpupool.demo

lint: venv
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.tls

bench-quick: venv
	$(BIN)/python -m bench.run --quick

# The server's reviewed op data (docs/security.md): regenerate after a torch upgrade, review the diff.
allowlist: venv
	$(BIN)/python tools/allowlist.py

kernel-sweep: venv
	$(BIN)/python tools/kernel_sweep.py -v
	$(BIN)/python tools/kernel_sweep.py --sanitised --findings

# Fuzzing (tools/fuzz): decoders and the executor (atheris), a live server, the controller's API;
# FUZZ_SECONDS each (default 60), FUZZ_FRAMES caps the live server's frames.
fuzz: venv
	FUZZ_SECONDS=$${FUZZ_SECONDS:-60} $(BIN)/python -m tools.fuzz

# On a machine with an NVIDIA GPU (no venv: uses the machine's own torch).
bench-gpu:
	PYTHONPATH=src:. python3 -m bench.run --gpu

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
