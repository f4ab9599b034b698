# mobile-vla: `make demo` and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, from the spec below, so nothing pulls a multi-GB CUDA build by accident.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install sysdeps demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# MuJoCo renders headless through EGL (Mesa) or OSMesa; install them when neither is present.
sysdeps:
	@if /sbin/ldconfig -p 2>/dev/null | grep -Eq 'libEGL_mesa\.so\.0|libOSMesa\.so'; then :; else \
	  echo "installing the GL libraries MuJoCo needs for headless rendering"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libosmesa6 >/dev/null; \
	fi

demo: install
	$(BIN)/mobile-vla collect --out $(DEMO_DIR)/data --episodes 48 --workers 2 --seed 0 \
	  --sim.image_size=[96,96]
	$(BIN)/mobile-vla inspect $(DEMO_DIR)/data
	rm -rf $(DEMO_DIR)/runs/frozen
	$(BIN)/mobile-vla train configs/builtin_frozen.yaml --data.path=$(DEMO_DIR)/data \
	  --trainer.output_dir=$(DEMO_DIR)/runs --trainer.run_name=frozen --trainer.max_epochs=1
	$(BIN)/mobile-vla eval $(DEMO_DIR)/runs/frozen

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/python bench/bench_data_sim.py
	$(BIN)/python bench/bench_strategies.py
	$(BIN)/python bench/bench_serving.py
	$(BIN)/python bench/bench_feature_cache.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
