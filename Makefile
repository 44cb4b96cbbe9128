# The two commands a new user runs: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

DEMO_DATA ?= runs/demo-data
DEMO_ROWS ?= 1000000

.PHONY: setup demo test plans clean

setup:
	@bash scripts/setup.sh

# The demo always trains from scratch: an earlier runs/demo (and its checkpoints) is removed first,
# otherwise the run would resume the finished one and only report its stored metrics.
demo: setup
	towerrec data synth --out $(DEMO_DATA) --rows $(DEMO_ROWS) --seed 0
	rm -rf runs/demo
	torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml --nproc_per_node 2
	@python -c "import json; m = json.load(open('runs/demo/eval_metrics.json')); \
	print('held-out metrics (runs/demo/eval_metrics.json):'); \
	[print(f'  {t:<12} auc {v[\"auc\"]:.4f}  ne {v[\"ne\"]:.4f}  logloss {v[\"logloss\"]:.4f}') for t, v in m.items()]"

# Two pytest workers: a test spends about a third of its time waiting (process start-up, a rank's
# timeout), which the other worker fills. Tests marked `serial` read the machine's load and run
# alone afterwards.
test: setup
	python -m pytest -q -n 2 -m "not serial" --durations=15 tests
	python -m pytest -q -m serial tests

# The example shard plans under docs/plans/ (billion-row tables on clusters that need not exist).
PLAN_CONFIG ?= configs/billion_scale.yaml
plans: setup
	rm -rf docs/plans/billion-*
	towerrec plan --config $(PLAN_CONFIG) --topology 2x8xA100-80GB --out docs/plans/billion-2x8
	towerrec plan --config $(PLAN_CONFIG) --topology 8x8xA100-80GB --out docs/plans/billion-8x8
	towerrec plan --config $(PLAN_CONFIG) --topology 8x8xA100-80GB,sparse_optimizer=adagrad,name=8x8xA100-80GB-adagrad \
	    --out docs/plans/billion-8x8-adagrad
	towerrec plan --config $(PLAN_CONFIG) --topology 2x8xA100-80GB,sparse_optimizer=adagrad,name=2x8xA100-80GB-adagrad \
	    --out docs/plans/billion-2x8-adagrad
	towerrec plan --config $(PLAN_CONFIG) --topology 2x8xA100-80GB --topology 4x8xA100-80GB \
	    --topology 8x8xA100-80GB --batch_sizes 4096,16384 --compare --out docs/plans/billion-compare

clean:
	rm -rf runs .pytest_cache
