# The two commands a new user runs: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

DEMO_DATA ?= runs/demo-data
DEMO_ROWS ?= 1000000

.PHONY: setup demo test clean

setup:
	@bash scripts/setup.sh

demo: setup
	towerrec data synth --out $(DEMO_DATA) --rows $(DEMO_ROWS) --seed 0
	torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml --nproc_per_node 2
	@python -c "import json; m = json.load(open('runs/demo/eval_metrics.json')); \
	print('held-out metrics (runs/demo/eval_metrics.json):'); \
	[print(f'  {t:<12} auc {v[\"auc\"]:.4f}  ne {v[\"ne\"]:.4f}  logloss {v[\"logloss\"]:.4f}') for t, v in m.items()]"

test: setup
	python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
