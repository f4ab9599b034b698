# mobile-vla: `make demo` and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, from the spec below, so nothing pulls a multi-GB CUDA build by accident.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PRETRAIN_DIR ?= runs/pretrain
PRETRAIN_IMAGES ?= 12000
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
# The real openpi client (PyPI openpi-client, which pins numpy < 2) in a venv of its own: the
# tests drive the simulator through it against `mobile-vla serve` (tests/test_openpi.py).
OPENPI_VENV ?= .venv-openpi
OPENPI_STAMP := $(OPENPI_VENV)/.installed

.PHONY: install openpi-client sysdeps demo pretrain test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

openpi-client: $(OPENPI_STAMP)

$(OPENPI_STAMP): Makefile
	@test -x $(OPENPI_VENV)/bin/python || $(PYTHON) -m venv $(OPENPI_VENV)
	$(OPENPI_VENV)/bin/python -m pip install -q "openpi-client==0.1.2" "typing_extensions>=4"
	@touch $(OPENPI_STAMP)

# MuJoCo renders headless through EGL (Mesa) or OSMesa; install them when neither is present.
# The study report's browser test opens the report in Debian's Chromium.
sysdeps:
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); PKGS=""; \
	if ! /sbin/ldconfig -p 2>/dev/null | grep -Eq 'libEGL_mesa\.so\.0|libOSMesa\.so'; then \
	  PKGS="libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libosmesa6"; fi; \
	if ! command -v chromium >/dev/null 2>&1; then PKGS="$$PKGS chromium"; fi; \
	if [ -n "$$PKGS" ]; then \
	  echo "installing system packages:$$PKGS"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$PKGS >/dev/null; \
	fi

# The quick study on the built-in backbone (configs/study_quick.yaml): frozen (Case 3) vs LoRA
# (Case 4) x 2 seeds at equal budgets, frozen_text (the arm that drives) beside them; collects,
# trains, evaluates (closed loop and language reliance), compares, writes the report with every
# arm's budget. The Case 3 vs Case 4 answer at real budgets: configs/study_case34.yaml.
demo: install
	$(BIN)/mobile-vla study configs/study_quick.yaml --output_dir=$(DEMO_DIR)

# Rebuild the built-in backbone's shipped vision-language weights (corpus + training +
# evaluation + export), then copy them into the package.
pretrain: install
	rm -rf $(PRETRAIN_DIR)
	$(BIN)/mobile-vla pretrain-data --out $(PRETRAIN_DIR)/corpus --images $(PRETRAIN_IMAGES) \
	  --workers 2 --seed 0
	$(BIN)/mobile-vla pretrain configs/pretrain.yaml --data $(PRETRAIN_DIR)/corpus \
	  --out $(PRETRAIN_DIR)/run
	cp $(PRETRAIN_DIR)/run/export/builtin-vl.safetensors $(PRETRAIN_DIR)/run/export/builtin-vl.json \
	  $(PRETRAIN_DIR)/run/export/MODEL_CARD.md src/mobile_vla/weights/

# The suite in two parts: everything but the timing-sensitive tests on TEST_WORKERS
# pytest-xdist workers (one file per worker at a time), then those (`-m serial`) alone on the
# machine. Exit status 5 ("no tests collected", e.g. PYTEST_ARGS names a file without serial
# tests) is not a failure.
test: install $(OPENPI_STAMP)
	$(BIN)/ruff check src tests bench
	MOBILE_VLA_OPENPI_PYTHON=$(OPENPI_VENV)/bin/python $(BIN)/python -m pytest \
	  -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	MOBILE_VLA_OPENPI_PYTHON=$(OPENPI_VENV)/bin/python $(BIN)/python -m pytest \
	  -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/python bench/bench_data_sim.py
	$(BIN)/python bench/bench_hdf5_chunks.py
	$(BIN)/python bench/bench_strategies.py
	$(BIN)/python bench/bench_serving.py
	$(BIN)/python bench/bench_lora_merge.py
	$(BIN)/python bench/bench_feature_cache.py
	$(BIN)/python bench/bench_compile.py
	$(BIN)/python bench/bench_cache_memory.py
	$(BIN)/python bench/bench_case4_limit.py

clean:
	rm -rf $(VENV) $(OPENPI_VENV) runs .pytest_cache .ruff_cache
