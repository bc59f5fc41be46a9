# wd-sok: the README's commands. `make demo` sets up .venv's one-process level on first use (no Horovod);
# `make test` and `make bench-quick` also build Horovod (`make setup-dist`). scripts/setup_env.sh has the timings.
PY      := .venv/bin/python
DEMO    := demo_data
SPEC    := data/outbrain_feature_spec.yaml
DEMO_ARGS ?= --num_epochs 2 --global_batch_size 4096 --eval_batch_size 16384 --deep_warmup_epochs 0.5 \
             --deep_learning_rate 0.001 --log_every 10

.PHONY: setup setup-dist demo test lint bench-quick clean-demo

setup:
	@bash scripts/setup_env.sh

setup-dist:
	@bash scripts/setup_env.sh --dist

$(DEMO)/feature_spec.yaml: $(SPEC) wd_sok/tools/generate.py | setup
	$(PY) -m wd_sok.tools.generate --feature_spec_in $(SPEC) --output $(DEMO) \
	    --train_rows 200000 --test_rows 50000 --train_files 4 --test_files 2 --seed 0

demo: setup $(DEMO)/feature_spec.yaml
	$(PY) main.py --dataset_path $(DEMO) --model_dir runs/demo/checkpoints --results_dir runs/demo/results \
	    --overwrite $(DEMO_ARGS)
	@echo "Bayes-optimal reference for this data: $$(cat $(DEMO)/generator_report.json)"

test: setup-dist
	$(PY) -m pytest tests/ -q -ra --durations=25

lint: setup
	.venv/bin/ruff check wd_sok tests main.py benchmarks scripts

bench-quick: setup-dist
	$(PY) benchmarks/bench_quick.py

clean-demo:
	rm -rf $(DEMO) runs/demo
