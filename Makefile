# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Re-install whenever the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Pretrained weights need the Hugging Face hub (or a local copy); the demo runs offline with random ones.
DEMO_WEIGHTS := $(if $(PRETRAINED),,--no-pretrained)

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadgroup

demo: setup
	$(PY) -m extract --config configs/demo.yaml $(DEMO_WEIGHTS)
	$(PY) -m probe --config configs/demo.yaml
	$(PY) -m profiling --config configs/demo.yaml
	$(PY) -m probe --config configs/demo.yaml --report-only
	$(PY) -m finetune --config configs/demo.yaml
	@echo "Report (open it in a browser): $(CURDIR)/runs/demo/report.html"
	@echo "Demo outputs in runs/demo/: probe/leaderboard.md, probe/results.csv, probe/confusion/, profiling/performance.csv, profiling/pareto.png, finetune/summary.md, finetune/search.png, finetune/best/, finetune/gradcam/"

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/startup.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/extract_overhead.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/extract_calibration.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/probe_vs_naive.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/probe_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/search_nevergrad_vs_random.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/frozen_phase_cache.py

clean:
	rm -rf runs/demo
